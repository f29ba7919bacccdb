"""The fake OpenAI-compatible server answers the real ``openai`` client as the API would."""

import openai
import pytest

from tests.fakes.openai_server import FakeOpenAIServer, Reply

pytestmark = pytest.mark.integration


def test_fake_server_scripts_valid_malformed_and_errors():
    with FakeOpenAIServer(lambda req: f"The answer is B. ({req['model']})") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=5)
        assert [m.id for m in client.models.list()] == ["pulse", "pulse-lora", "gpt-4o"]

        server.script(Reply(status=429), Reply(status=500), Reply(body=b"{not json"))
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="pulse", messages=[{"role": "user", "content": "q"}])
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="pulse", messages=[{"role": "user", "content": "q"}])
        with pytest.raises(ValueError):  # the client cannot decode the body
            client.chat.completions.create(model="pulse", messages=[{"role": "user", "content": "q"}])

        out = client.chat.completions.create(
            model="pulse-lora", messages=[{"role": "user", "content": "q"}]
        )
        assert out.choices[0].message.content == "The answer is B. (pulse-lora)"
        assert len(server.chat_requests) == 4
        assert server.chat_requests[-1].json["model"] == "pulse-lora"
