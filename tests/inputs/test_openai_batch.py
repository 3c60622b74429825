"""OpenAI Batch API request files: converted once into flat columns, bad lines named by number."""

from __future__ import annotations

import json

import pytest

from batchgen import composition
from batchgen.config import DatasetConfig
from batchgen.errors import DataError
from batchgen.inputs import dataset, openai_batch

SCHEMA = {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}


def request(custom_id, messages=None, **body):
    messages = messages or [{"role": "user", "content": f"Say {custom_id}."}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": messages, **body},
    }


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openai_batch"


def config(path, **over):
    return DatasetConfig(
        path=str(path),
        id_column=openai_batch.ID_COLUMN,
        messages_column=openai_batch.MESSAGES_COLUMN,
        sampling_column=openai_batch.SAMPLING_COLUMN,
        **over,
    )


def overrides(body):
    return openai_batch.sampling_overrides(body)


def test_the_preset_reads_the_converted_columns():
    d = composition.compose_job(["dataset=openai_batch", "dataset.path=requests.jsonl"]).dataset
    assert (d.id_column, d.messages_column, d.sampling_column) == (
        openai_batch.ID_COLUMN,
        openai_batch.MESSAGES_COLUMN,
        openai_batch.SAMPLING_COLUMN,
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # OpenAI samples unless temperature is 0; left-out keys keep the run's values.
        ({}, {"do_sample": True}),
        ({"max_tokens": 7}, {"do_sample": True, "max_new_tokens": 7}),
        ({"max_tokens": 7, "max_completion_tokens": 9}, {"do_sample": True, "max_new_tokens": 9}),
        ({"temperature": 0.7, "top_p": 0.9}, {"do_sample": True, "temperature": 0.7, "top_p": 0.9}),
        ({"temperature": 0, "top_p": 0.5}, {"do_sample": False}),
        ({"temperature": None, "n": 3}, {"do_sample": True, "num_return_sequences": 3}),
        ({"stop": "\n"}, {"do_sample": True, "stop": ["\n"]}),
        ({"stop": ["a", "b\\n"]}, {"do_sample": True, "stop": ["a", "b\\n"]}),
        ({"seed": 11}, {"do_sample": True, "seed": 11}),
        ({"response_format": {"type": "text"}}, {"do_sample": True}),
        (
            {"response_format": {"type": "json_object"}},
            {"do_sample": True, "json_schema": '{"type":"object"}'},
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            {
                "do_sample": True,
                "json_schema": json.dumps(SCHEMA, separators=(",", ":")),
            },
        ),
    ],
)
def test_body_settings_become_sampling_overrides(body, expected):
    assert overrides(body) == expected


def test_rows_hold_id_messages_and_sampling_json(tmp_path, cache, capsys):
    parts = [{"type": "text", "text": "Name"}, {"type": "text", "text": "a color."}]
    path = write(
        tmp_path / "requests.jsonl",
        [
            request(
                "a",
                [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
            ),
            "",
            request("b", [{"role": "user", "content": parts, "name": "bob"}], temperature=0, n=2),
            request("c", max_tokens=5, logprobs=True, top_logprobs=2, frequency_penalty=0.1),
        ],
    )
    table = dataset.open_dataset(config(path))
    rows = table.rows(0, len(table)).columns
    assert rows["custom_id"] == ["a", "b", "c"]
    assert rows["messages"][:2] == [
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Name\na color."}],
    ]
    assert [json.loads(s) for s in rows["sampling"]] == [
        {"do_sample": True},
        {"do_sample": False, "num_return_sequences": 2},
        {"do_sample": True, "max_new_tokens": 5},
    ]
    err = capsys.readouterr().err
    assert "body.model ('gpt-4o-mini') is ignored" in err
    assert "frequency_penalty (1), logprobs (1), messages[].name (1), top_logprobs (1) (log" in err
    assert len(list(cache.glob("*.arrow"))) == 1

    # A second open reads the cached file, and says the same again.
    dataset.open_dataset(config(path))
    out = capsys.readouterr()
    assert "converting" not in out.out and "frequency_penalty (1)" in out.err


def test_converted_rows_stream_and_limit(tmp_path):
    path = write(tmp_path / "requests.jsonl", [request(f"r{i}") for i in range(5)])
    assert len(dataset.open_dataset(config(path, limit=3))) == 3
    stream = dataset.open_dataset(config(path, streaming=True))
    blocks = list(stream.blocks(2))
    assert [start for start, _ in blocks] == [0, 2, 4]
    assert stream.rows(*blocks[1]).columns["custom_id"] == ["r2", "r3"]


def test_many_batches_convert_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(openai_batch, "BATCH_LINES", 7)
    path = write(tmp_path / "requests.jsonl", [request(f"r{i}", seed=i) for i in range(50)])
    table = dataset.open_dataset(config(path))
    rows = table.rows(0, 50).columns
    assert rows["custom_id"] == [f"r{i}" for i in range(50)]
    assert [json.loads(s)["seed"] for s in rows["sampling"]] == list(range(50))


def test_a_changed_file_is_converted_again(tmp_path, cache):
    path = write(tmp_path / "requests.jsonl", [request("a")])
    dataset.open_dataset(config(path))
    write(path, [request("a"), request("b")])
    assert len(dataset.open_dataset(config(path))) == 2
    assert len(list(cache.glob("*.arrow"))) == 2


def test_a_plain_jsonl_file_is_not_a_request_file(tmp_path):
    plain = write(tmp_path / "prompts.jsonl", [{"id": "x", "prompt": "hi"}])
    assert not openai_batch.is_request_file(plain)
    assert openai_batch.is_request_file(write(tmp_path / "r.jsonl", ["", request("a")]))


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("{not json", "line 2: not valid JSON"),
        ("[1, 2]", "line 2: a JSON list, not an object"),
        ({"body": {"messages": [{"role": "user", "content": "x"}]}}, "line 2: custom_id:"),
        ({**request("b"), "url": "/v1/embeddings"}, "line 2: url: expected '/v1/chat/completions'"),
        ({**request("b"), "method": "GET"}, "line 2: method: expected 'POST'"),
        ({"custom_id": "b", "body": {}}, "line 2: body.messages: expected a non-empty list"),
        (request("b", [{"content": "x"}]), "line 2: body.messages[0].role:"),
        (request("b", [{"role": "user", "content": None}]), "line 2: body.messages[0].content:"),
        (
            request("b", [{"role": "user", "content": [{"type": "image_url"}]}]),
            "line 2: body.messages[0].content[0]: a 'image_url' part",
        ),
        (request("b", temperature=3), "line 2: body.temperature: expected a number from 0.0"),
        (request("b", max_tokens=0), "line 2: body.max_tokens: expected an integer >= 1"),
        (request("b", n="2"), "line 2: body.n: expected an integer >= 1"),
        (request("b", stop=[1]), "line 2: body.stop: expected a string or a list of strings"),
        (request("b", seed=1.5), "line 2: body.seed: expected an integer"),
        (
            request("b", response_format={"type": "grammar"}),
            "line 2: body.response_format.type: 'grammar' is not one of",
        ),
        (
            request("b", response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            "line 2: body.response_format.json_schema.schema: expected an object",
        ),
        (
            request(
                "b",
                response_format={"type": "json_schema", "json_schema": {"schema": {"type": 5}}},
            ),
            "line 2: body.response_format: body.response_format.json_schema.schema: not a valid",
        ),
    ],
)
def test_a_bad_line_is_named_by_number_and_key(tmp_path, cache, line, named):
    path = write(tmp_path / "requests.jsonl", [request("a"), line, request("c")])
    with pytest.raises(DataError, match="requests.jsonl") as info:
        dataset.open_dataset(config(path))
    assert named in str(info.value)
    assert not list(cache.iterdir())  # nothing half-converted is left to be found
