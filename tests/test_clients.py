"""Third-party clients on a live loopback server: LangChain (ChatOpenAI, on chat completions
and on the Responses API, and ChatAnthropic) with ``bind_tools`` and
``with_structured_output``, LiteLLM, and the model routes they read first."""

import httpx
import pytest
from pydantic import BaseModel, Field

from conftest import TurnModel

CALL = 'Checking.<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'
ANSWER = "It is sunny in Paris."


class Person(BaseModel):
    name: str = Field(max_length=8)
    adult: bool


def get_weather(city: str) -> str:
    """Weather in a city."""
    return "sunny"


@pytest.fixture(scope="module")
def real(serve, chat_model):
    model, tok, _ = chat_model
    return serve(model, tok, model_id="lfm2-tiny")[0]


@pytest.fixture(scope="module")
def agent(serve, chat_model):
    """A server whose model calls get_weather, then answers once it has the result."""
    tok = chat_model[1]
    ids = lambda text: tok.encode(text, add_special_tokens=False) + [7]  # noqa: E731
    marker = tok.encode("<|tool_response_end|>", add_special_tokens=False)[0]
    return serve(TurnModel(ids(CALL), ids(ANSWER), marker), tok, model_id="lfm2-tiny")[0]


def test_models_are_listed_and_looked_up_by_name(real):
    listed = httpx.get(real + "/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["lfm2-tiny"]
    one = httpx.get(real + "/v1/models/lfm2-tiny")
    assert one.status_code == 200 and one.json()["id"] == "lfm2-tiny" and one.json()["object"] == "model"
    missing = httpx.get(real + "/v1/models/gpt-4")
    assert missing.status_code == 404 and "lfm2-tiny" in missing.json()["error"]["message"]


def test_the_served_name_is_a_name_never_a_path(tmp_path):
    from mlx_lfm2.serve.app import served_name

    folder = tmp_path / "LFM2-350M-4bit"
    folder.mkdir()
    assert served_name(str(folder)) == "LFM2-350M-4bit"
    assert served_name(str(folder) + "/") == "LFM2-350M-4bit"
    assert served_name("LiquidAI/LFM2-8B-A1B") == "LiquidAI/LFM2-8B-A1B"  # a hub repo id is a name
    assert served_name(str(folder), "lfm2") == "lfm2"


@pytest.mark.slow
@pytest.mark.parametrize("responses_api", [False, True])
def test_langchain_chat_openai_binds_tools_and_structured_output(agent, real, responses_api):
    lc = pytest.importorskip("langchain_openai")
    tools_llm = lc.ChatOpenAI(base_url=agent + "/v1", api_key="x", model="lfm2-tiny", max_retries=0,
                              use_responses_api=responses_api, max_tokens=64).bind_tools([get_weather])
    msg = tools_llm.invoke("Weather in Paris?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert msg.usage_metadata["input_tokens"] > 0

    llm = lc.ChatOpenAI(base_url=real + "/v1", api_key="x", model="lfm2-tiny", max_retries=0, temperature=0,
                        use_responses_api=responses_api, max_tokens=200)
    person = llm.with_structured_output(Person, method="json_schema", strict=True).invoke("A person, please")
    assert isinstance(person, Person)


@pytest.mark.slow
def test_langchain_chat_anthropic_binds_tools_structured_output_and_streams_usage(agent, real):
    lc = pytest.importorskip("langchain_anthropic")
    llm = lc.ChatAnthropic(base_url=agent, api_key="x", model="lfm2-tiny", max_retries=0, max_tokens=64)
    msg = llm.bind_tools([get_weather]).invoke("Weather in Paris?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]

    real_llm = lc.ChatAnthropic(base_url=real, api_key="x", model="lfm2-tiny", max_retries=0, max_tokens=200,
                                temperature=0)
    assert isinstance(real_llm.with_structured_output(Person).invoke("A person, please"), Person)
    chunks = list(real_llm.stream("Hello"))
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    # langchain-anthropic reads the prompt's size from message_delta's usage
    assert total.usage_metadata["input_tokens"] > 0 and total.usage_metadata["output_tokens"] > 0


@pytest.mark.slow
def test_litellm_completion_and_responses(agent, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its bundled price list, not a download
    litellm = pytest.importorskip("litellm")
    r = litellm.completion(model="openai/lfm2-tiny", api_base=agent + "/v1", api_key="x", max_tokens=64,
                           messages=[{"role": "user", "content": "Weather in Paris?"}],
                           tools=[{"type": "function", "function": {
                               "name": "get_weather", "description": "Weather in a city", "parameters": {
                                   "type": "object", "properties": {"city": {"type": "string"}}}}}])
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and r.usage.prompt_tokens > 0
    r = litellm.responses(model="openai/lfm2-tiny", api_base=agent + "/v1", api_key="x", input="Hello there",
                          max_output_tokens=64)
    assert r.output and r.usage.input_tokens > 0
