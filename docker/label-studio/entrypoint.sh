#!/bin/sh
# Label Studio in docker/compose.yaml: the admin and its API token are created on the first start from
# LABEL_STUDIO_USERNAME / _PASSWORD / _USER_TOKEN (the environment, never a command line); without them there would be
# no account to sign in with and no token for the worker, so the container stops at once saying which to set.
set -eu
: "${LABEL_STUDIO_PASSWORD:?set RLHF_LABEL_STUDIO_PASSWORD}"
: "${LABEL_STUDIO_USER_TOKEN:?set RLHF_LABEL_STUDIO_TOKEN}"
exec label-studio start --no-browser --internal-host 0.0.0.0 --port 8080
