"""The Responses API (``/v1/responses``) on a live loopback server, driven by the official
``openai`` SDK and the OpenAI Agents SDK."""

import json

import httpx
import pytest

from conftest import TurnModel

openai = pytest.importorskip("openai")

TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": False,
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CALL = 'Checking.<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'
ANSWER = "It is sunny in Paris."


@pytest.fixture(scope="module")
def real(serve, chat_model):
    model, tok, _ = chat_model
    base, _ = serve(model, tok)
    return base, openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def agent_server(serve, chat_model):
    """A server whose model calls get_weather, then answers once it has the result."""
    tok = chat_model[1]
    ids = lambda text: tok.encode(text, add_special_tokens=False) + [7]  # noqa: E731
    marker = tok.encode("<|tool_response_end|>", add_special_tokens=False)[0]
    base, _ = serve(TurnModel(ids(CALL), ids(ANSWER), marker), tok)
    return base, openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)


def test_a_response_whole_and_streamed_match_the_chat_route(real):
    base, client = real
    r = client.responses.create(model="m", input="Count to three", instructions="Be brief.", max_output_tokens=6,
                                temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 6
    chat = client.chat.completions.create(model="m", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three"}])
    assert r.output_text == chat.choices[0].message.content  # instructions: the system message
    assert r.usage.input_tokens == chat.usage.prompt_tokens

    with client.responses.stream(model="m", input="Count to three", instructions="Be brief.", max_output_tokens=6,
                                 temperature=0) as s:
        events = [e for e in s]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output[0].content[0].text == r.output_text


def test_function_calls_come_back_as_items_and_their_outputs_are_answered(agent_server):
    base, client = agent_server
    r = client.responses.create(model="m", input="Weather in Paris?", tools=TOOLS, max_output_tokens=64)
    assert [i.type for i in r.output] == ["message", "function_call"] and r.status == "completed"
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and r.output[0].content[0].text == "Checking."

    follow = client.responses.create(model="m", previous_response_id=r.id, tools=TOOLS, max_output_tokens=64, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}])
    assert follow.output_text == ANSWER and follow.previous_response_id == r.id
    # the stored reply is the text the model wrote: the next prompt extends the cached one
    assert follow.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens + r.usage.output_tokens - 1

    # without the store: the whole history as input items, as Codex sends it
    again = client.responses.create(model="m", store=False, tools=TOOLS, max_output_tokens=64, input=[
        {"role": "user", "content": "Weather in Paris?"}, *[i.model_dump() for i in r.output],
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}])
    assert again.output_text == ANSWER
    assert httpx.get(f"{base}/v1/responses/{again.id}").status_code == 404  # store: false keeps nothing

    with client.responses.stream(model="m", input="Weather in Paris?", tools=TOOLS, max_output_tokens=64) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    assert [(i.type, getattr(i, "name", None)) for i in final.output] == [("message", None),
                                                                        ("function_call", "get_weather")]


def test_stored_responses_are_retrieved_continued_and_deleted(real):
    base, client = real
    r = client.responses.create(model="m", input="Hello", instructions="Be brief.", max_output_tokens=4, temperature=0)
    assert client.responses.retrieve(r.id).output_text == r.output_text
    second = client.responses.create(model="m", input="And then?", previous_response_id=r.id,
                                     instructions="Be brief.", max_output_tokens=4, temperature=0)
    # the conversation so far is the cached prefix: only the new turn is prefilled
    assert second.usage.input_tokens_details.cached_tokens == r.usage.input_tokens + r.usage.output_tokens
    deleted = client.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="m", input="x", previous_response_id=r.id)
    assert "previous response" in e.value.message


def test_text_format_json_schema_is_followed(real):
    jsonschema = pytest.importorskip("jsonschema")
    _, client = real
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "adult": {"type": "boolean"}},
              "required": ["name", "adult"], "additionalProperties": False}
    r = client.responses.create(model="m", input="A person", max_output_tokens=200, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)


@pytest.mark.parametrize("body, status, words", [
    ({"input": [{"type": "computer_call", "id": "x"}]}, 400, ["computer_call"]),
    ({"input": [{"role": "critic", "content": "x"}]}, 400, ["role"]),
    ({"input": [{"role": "user", "content": [{"type": "input_video"}]}]}, 400, ["input_video"]),
    ({"input": "x", "tool_choice": "sometimes"}, 422, ["tool_choice"]),
    ({"input": "x", "max_output_tokens": 0}, 422, ["max_output_tokens"]),
    ({"input": []}, 422, ["input"]),
])
def test_bad_requests_are_refused_in_words(real, body, status, words):
    base, _ = real
    r = httpx.post(base + "/v1/responses", json=body)
    assert r.status_code == status, r.text
    assert all(w in r.json()["error"]["message"] for w in words), r.text
    assert httpx.get(base + "/v1/responses/resp_nope").status_code == 404


def test_images_and_files_are_placeholders():
    from mlx_lfm2.serve.responses_api import input_messages

    assert input_messages([{"role": "user", "content": [{"type": "input_text", "text": "See "},
                                                        {"type": "input_image", "image_url": "data:..."}]}]) == [
        {"role": "user", "content": "See [image omitted: this model reads text only]"}]


@pytest.mark.slow
def test_openai_agents_sdk_runs_a_function_tool(agent_server):
    """The Agents SDK's default model is the Responses API: the agent calls the tool, gets
    its result and finishes with the model's answer."""
    agents = pytest.importorskip("agents")
    base, _ = agent_server
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        calls.append(city)
        return "sunny"

    model = agents.OpenAIResponsesModel(model="local", openai_client=openai.AsyncOpenAI(base_url=base + "/v1",
                                                                                        api_key="x"))
    agent = agents.Agent(name="weather", instructions="Answer with the tool.", model=model, tools=[get_weather],
                         model_settings=agents.ModelSettings(max_tokens=64))
    result = agents.Runner.run_sync(agent, "Weather in Paris?", run_config=agents.RunConfig(tracing_disabled=True))
    assert calls == ["Paris"] and result.final_output == ANSWER


def test_the_store_is_bounded_by_bytes_keeping_the_newest():
    from mlx_lfm2.serve.responses import Store

    store = Store(limit=100, max_bytes=10_000)
    turn = {"role": "user", "content": "x" * 1000}
    for i in range(30):  # a chain: each response stores the whole conversation so far
        store.put({"id": f"r{i}"}, [turn] * (i + 1))
        assert store.bytes <= 10_000 or len(store._entries) == 1
    assert store.get("r29") is not None and store.get("r0") is None
    with pytest.raises(Exception, match="the latest 100 within"):
        store.conversation("r0")
    assert store.delete("r29") and store.bytes == 0
