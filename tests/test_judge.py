"""The judges (stages/lib/judge.py) other than the judge reward model, which tests/test_own_data.py trains.

No LLM endpoint is reachable here, so the endpoint judge is tested against a stand-in OpenAI-compatible server on
loopback (real HTTP, a rule instead of a model), and the scorer judge with a real MLflow GenAI scorer.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from stages.lib.judge import EndpointJudge, GoldJudge, JudgeConfig, ScorerJudge, load_judge, resolve_kind
from stages.lib.outcome import BadInput
from stages.lib.params import defaults


def test_auto_is_gold_on_the_default_task_and_a_judge_rm_elsewhere():
    assert resolve_kind(defaults(JudgeConfig), ["\n\nHuman: What is 2 plus 3?\n\nAssistant:"]) == "gold"
    assert resolve_kind(defaults(JudgeConfig), ["\n\nHuman: Write me a haiku.\n\nAssistant:"]) == "reward_model"
    assert (
        resolve_kind(defaults(JudgeConfig, kind="reward_model"), ["\n\nHuman: What is 2 plus 3?\n\nAssistant:"])
        == "reward_model"
    )
    with pytest.raises(BadInput, match="grades only the default task"):
        GoldJudge().scores(["\n\nHuman: Write me a haiku.\n\nAssistant:"], ["No."])
    for bad in ({"kind": "oracle"}, {"fraction": 1.0}, {"kind": "scorer"}, {"kind": "endpoint", "endpoint": "ftp://x"}):
        with pytest.raises(ValueError):
            defaults(JudgeConfig, **bad)


SCORERS = '''
from mlflow.genai.scorers import scorer


@scorer
def politeness(inputs, outputs):
    """An MLflow GenAI scorer, as a user would write one."""
    return 1.0 if "please" in outputs.lower() or "thank" in outputs.lower() else 0.0


def length(prompt, reply):
    return len(reply.split())
'''


def test_an_mlflow_genai_scorer_or_a_plain_function_is_a_judge(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(SCORERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = ScorerJudge("my_scorers:politeness")
    assert judge.name == "scorer:my_scorers:politeness" and judge.keywords
    assert judge.scores(["q", "q"], ["Thank you!", "No."]) == [1.0, 0.0]
    assert ScorerJudge("my_scorers:length").scores(["q"], ["one two three"]) == [3.0]
    with pytest.raises(BadInput, match="cannot be imported"):
        ScorerJudge("my_scorers:nothing")
    sys.modules.pop("my_scorers", None)


class _StandIn(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions server whose 'model' rates replies that end properly."""

    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _StandIn.seen.append(body)
        reply = body["messages"][0]["content"].rsplit("Reply to grade: ", 1)[1]
        answer = "Score: 9" if reply.endswith(".") else "3"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_an_llm_endpoint_is_a_judge(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
    try:
        (tmp_path / "judge.json").write_text(json.dumps({"kind": "endpoint", "endpoint": url, "endpoint_model": "m1"}))
        judge = load_judge(tmp_path)
        assert isinstance(judge, EndpointJudge) and judge.name == "endpoint:m1"
        assert judge.scores(["\n\nHuman: Hi\n\nAssistant:"] * 2, ["Hello there.", "hello"]) == [9.0, 3.0]
        assert _StandIn.seen[-1]["model"] == "m1" and "Hi" in _StandIn.seen[-1]["messages"][0]["content"]
    finally:
        server.shutdown()
    with pytest.raises(BadInput, match="gave no usable answer"):
        EndpointJudge(url, "m1", timeout=5).scores(["q"], ["r"])  # the server is gone: one line, not a traceback
