#!/bin/sh
# `rlhf-services postgres`: initdb on the first start (role $POSTGRES_USER, password $POSTGRES_PASSWORD), databases
# prefect, mlflow and labelstudio created when missing (every start), then PostgreSQL in the foreground.
# `rlhf-services sshd`: the DVC remote, key login only for user dvc (authorized keys: the file $DVC_AUTHORIZED_KEYS),
# store in /srv/dvc/store.
set -eu
case "${1:-}" in
postgres)
    data=/var/lib/postgresql/data
    bin=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
    mkdir -p "$data" /var/run/postgresql && chown -R postgres:postgres "$data" /var/run/postgresql
    if [ ! -s "$data/PG_VERSION" ]; then
        : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
        printf '%s' "$POSTGRES_PASSWORD" > /tmp/pw && chown postgres /tmp/pw
        su postgres -s /bin/sh -c "$bin/initdb -D $data -U ${POSTGRES_USER:-rlhf} --pwfile=/tmp/pw --auth=scram-sha-256 --no-locale -E UTF8"
        rm -f /tmp/pw
        echo "host all all 0.0.0.0/0 scram-sha-256" >> "$data/pg_hba.conf"
    fi
    # every start: the databases the services need, created when missing (a volume made before Label Studio joined
    # the stack gets `labelstudio` too), on a socket-only server that is stopped again before the real one starts
    : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
    su postgres -s /bin/sh -c "$bin/pg_ctl -D $data -o '-c listen_addresses=' -w start"
    for db in prefect mlflow labelstudio; do
        sql="SELECT 'CREATE DATABASE $db' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$db')\\gexec"
        printf '%s\n' "$sql" | su postgres -s /bin/sh -c \
            "PGPASSWORD='$POSTGRES_PASSWORD' psql -q -h /var/run/postgresql -U ${POSTGRES_USER:-rlhf} -d postgres"
    done
    su postgres -s /bin/sh -c "$bin/pg_ctl -D $data -m fast -w stop"
    exec su postgres -s /bin/sh -c "exec $bin/postgres -D $data -c listen_addresses='*'"
    ;;
sshd)
    mkdir -p /srv/dvc/store /etc/ssh/keys && chown dvc:dvc /srv/dvc/store
    [ -f /etc/ssh/keys/host_ed25519 ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/keys/host_ed25519
    cp "${DVC_AUTHORIZED_KEYS:?mount the public keys and set DVC_AUTHORIZED_KEYS}" /etc/ssh/keys/authorized_keys
    chown dvc /etc/ssh/keys/authorized_keys && chmod 600 /etc/ssh/keys/authorized_keys
    exec /usr/sbin/sshd -D -e -o HostKey=/etc/ssh/keys/host_ed25519 -o AuthorizedKeysFile=/etc/ssh/keys/authorized_keys \
        -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o AllowUsers=dvc -o PermitRootLogin=no \
        -o StrictModes=no -o "Subsystem sftp internal-sftp"
    ;;
*) echo "usage: rlhf-services postgres|sshd" >&2; exit 64 ;;
esac
