"""Instruction and chat rows: template and chat rendering, bad rows, and the loss mask they give."""

from __future__ import annotations

import json

import numpy as np
import pytest

from Ava.config import SourceConfig
from Ava.data.packing import tokenize_documents
from Ava.data.records import DataReport, Document, Row
from Ava.data.tokenizer import AvaTokenizer
from Ava.errors import AvaConfigError, AvaDataError
from Ava.multi_column_data import row_to_document, validate_template

IGNORE_INDEX = -100

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six."},
]


@pytest.fixture(scope="module")
def tok() -> AvaTokenizer:
    texts = [
        "Question: what is the capital of France? Answer: Paris is the capital.",
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n",
        "User: hello there\nAssistant: hello, how can I help?\n",
        "The quick brown fox jumps over the lazy dog. {braces} and numbers 12345.",
    ] * 4
    return AvaTokenizer.train(texts, vocab_size=300, min_frequency=1)


def template_source(prompt: str, response: str, train_on_prompt: bool = False, bad_rows: str = "error") -> SourceConfig:
    return SourceConfig(path="qa.jsonl", bad_rows=bad_rows,
                        template={"prompt": prompt, "response": response, "train_on_prompt": train_on_prompt})


def chat_source(template: str = "chatml", train_on: str = "assistant", bad_rows: str = "error") -> SourceConfig:
    return SourceConfig(path="chat.jsonl", bad_rows=bad_rows, chat={"template": template, "train_on": train_on})


def render(source: SourceConfig, fields: dict, report: DataReport | None = None) -> Document | None:
    return row_to_document(Row(fields, "qa.jsonl:3", "data/qa.jsonl:3"), source, "qa", report or DataReport())


# ---------------------------------------------------------------------------------------------
# templates
# ---------------------------------------------------------------------------------------------


def test_template_renders_columns_literal_braces_and_non_strings():
    source = template_source("### {instruction} {{literal}}\nn={n} ok={ok} none=[{missing_value}]\n", "{output}")
    doc = render(source, {"instruction": "Add", "n": 3, "ok": True, "missing_value": None, "output": "5"})
    assert doc.text == "### Add {literal}\nn=3 ok=True none=[]\n5"
    assert doc.segments == (("### Add {literal}\nn=3 ok=True none=[]\n", False), ("5", True))
    assert doc.name == "qa.jsonl:3" and doc.source == "data/qa.jsonl:3" and doc.source_name == "qa"


def test_template_format_spec_and_conversion():
    doc = render(template_source("{score:.2f} {word!r}\n", "{output}"), {"score": 0.5, "word": "x", "output": "y"})
    assert doc.segments[0] == ("0.50 'x'\n", False)


def test_template_missing_column_error_names_row_column_and_columns():
    source = template_source("{instruction}\n{input}\n", "{output}")
    with pytest.raises(AvaDataError) as err:
        render(source, {"instruction": "Add", "output": "5"})
    message = str(err.value)
    assert message.startswith("data/qa.jsonl:3: missing column 'input' (columns: 'instruction', 'output')")
    assert "bad_rows: skip" in message and "\n" not in message


def test_template_missing_column_skipped_and_counted():
    report = DataReport()
    source = template_source("{instruction}\n{input}\n", "{output}", bad_rows="skip")
    assert render(source, {"instruction": "Add", "output": "5"}, report) is None
    assert render(source, {"instruction": "Add", "input": "2 3", "output": "5"}, report) is not None
    assert report.to_dict() == {"qa": {"skipped rows (missing column)": 1}}
    assert report.examples[("qa", "skipped rows (missing column)")] == ["data/qa.jsonl:3"]


def test_template_non_text_column_is_a_bad_row():
    with pytest.raises(AvaDataError, match="column 'input' in template.prompt is list"):
        render(template_source("{input}", "{output}"), {"input": [1, 2], "output": "x"})


def test_template_empty_response_is_counted_not_an_error():
    report = DataReport()
    assert render(template_source("{q}\n", "{a}"), {"q": "hi", "a": "  "}, report) is None
    assert render(template_source("{q}\n", "{a}"), {"q": "hi", "a": None}, report) is None
    assert report.to_dict() == {"qa": {"empty rows": 2}}


@pytest.mark.parametrize("prompt, problem", [
    ("{instruction", "expected '}' before end of string"),
    ("instruction}", "Single '}'"),
    ("{}", "names no column"),
    ("{0}", "positional placeholder"),
    ("{x!z}", "unknown conversion"),
])
def test_malformed_template_is_a_config_error_even_when_skipping(prompt: str, problem: str):
    source = template_source(prompt, "{output}", bad_rows="skip")
    with pytest.raises(AvaConfigError, match="template.prompt: malformed template") as err:
        render(source, {"instruction": "a", "output": "b", "x": "c"})
    assert problem in str(err.value) and "'qa.jsonl'" in str(err.value)
    with pytest.raises(AvaConfigError, match=r"^data\.sources\[2\]\.template\.prompt: "):
        validate_template(source.template, where="data.sources[2].template")


def test_validate_template_lists_columns_once_in_order():
    source = template_source("{instruction}\n{input} {{not_a_column}} {instruction}\n", "{output}")
    assert validate_template(source.template) == ["instruction", "input", "output"]
    assert validate_template("{a:>5}{b!r}") == ["a", "b"]


def test_text_field_rows_still_work():
    source = SourceConfig(path="a.jsonl")
    doc = render(source, {"text": "hello"})
    assert doc.text == "hello" and doc.segments is None
    with pytest.raises(AvaDataError, match="no field 'text'"):
        render(source, {"body": "hello"})


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------


def test_chatml_rendering_and_segments():
    doc = render(chat_source("chatml"), {"messages": CHAT})
    assert doc.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
        "<|im_start|>assistant\nFour.<|im_end|>\n"
        "<|im_start|>user\nAnd three plus three?<|im_end|>\n"
        "<|im_start|>assistant\nSix.<|im_end|>\n"
    )
    assert [t for t, trains in doc.segments if trains] == ["Four.<|im_end|>\n", "Six.<|im_end|>\n"]
    assert "".join(t for t, _ in doc.segments) == doc.text
    # neighbouring segments alternate: untrained headers/turns, trained answers
    assert [trains for _, trains in doc.segments] == [False, True, False, True]


def test_plain_rendering_and_segments():
    doc = render(chat_source("plain"), {"messages": CHAT})
    assert doc.text == ("System: Be brief.\nUser: What is two plus two?\nAssistant: Four.\n"
                        "User: And three plus three?\nAssistant: Six.\n")
    assert [t for t, trains in doc.segments if trains] == ["Four.\n", "Six.\n"]


def test_chat_accepts_a_json_string_column():
    as_list = render(chat_source(), {"messages": CHAT})
    as_json = render(chat_source(), {"messages": json.dumps(CHAT)})
    assert as_json == as_list


def test_chat_train_on_all_is_one_training_segment():
    doc = render(chat_source(train_on="all"), {"messages": CHAT})
    assert doc.segments == ((doc.text, True),)


def test_chat_empty_message_list_is_counted_as_empty():
    report = DataReport()
    assert render(chat_source(), {"messages": []}, report) is None
    assert report.to_dict() == {"qa": {"empty rows": 1}}


@pytest.mark.parametrize("messages, expected", [
    ({"role": "user", "content": "hi"}, "field 'messages' is dict, not a list of messages"),
    ("[{'role': 'user'}]", "field 'messages' is a string but not a JSON list of messages"),
    ([{"role": "user", "content": "hi"}, "hello"], "field 'messages' message 1 is str, not an object"),
    ([{"from": "human", "value": "hi"}], "field 'messages' message 0 has no 'role'"),
    ([{"role": "user"}], "field 'messages' message 0 has no 'content'"),
    ([{"role": "bot", "content": "hi"}], "message 0 has role 'bot'; use one of system, user, assistant"),
    ([{"role": "user", "content": 3}], "message 0 has content of type int"),
    ([{"role": "user", "content": "hi"}], "has no assistant message"),
])
def test_bad_chat_rows_raise_with_location_and_fix(messages, expected: str):
    with pytest.raises(AvaDataError) as err:
        render(chat_source(), {"messages": messages})
    message = str(err.value)
    assert message.startswith("data/qa.jsonl:3: ") and expected in message and "\n" not in message


def test_bad_chat_rows_skipped_and_counted():
    report = DataReport()
    source = chat_source(bad_rows="skip")
    assert render(source, {"messages": [{"role": "bot", "content": "hi"}]}, report) is None
    assert render(source, {"conversation": CHAT}, report) is None
    assert render(source, {"messages": CHAT}, report) is not None
    assert report.to_dict() == {"qa": {"skipped rows (bad messages)": 1, "skipped rows (missing field)": 1}}


# ---------------------------------------------------------------------------------------------
# the loss mask these documents give
# ---------------------------------------------------------------------------------------------


def _trained_token_count(tok: AvaTokenizer, doc: Document) -> int:
    return sum(len(tok.encode(text)) for text, trains in doc.segments if trains)


def test_template_mask_covers_exactly_the_response_and_eos(tok: AvaTokenizer):
    doc = render(template_source("Question: {q}\nAnswer: ", "{a}"),
                 {"q": "what is the capital of France?", "a": "Paris is the capital."})
    stream = tokenize_documents(tok, [doc])
    mask = stream.loss_mask.astype(bool)
    assert len(stream) == len(tok.encode(doc.segments[0][0])) + len(tok.encode("Paris is the capital.")) + 1
    assert mask.sum() == len(tok.encode("Paris is the capital.")) + 1
    assert stream.tokens[-1] == tok.eos_id and mask[-1]
    assert tok.decode(stream.tokens[mask].tolist(), skip_special_tokens=True) == "Paris is the capital."
    assert tok.decode(stream.tokens[~mask].tolist()) == "Question: what is the capital of France?\nAnswer: "


def test_train_on_prompt_masks_nothing(tok: AvaTokenizer):
    doc = render(template_source("Question: {q}\n", "{a}", train_on_prompt=True), {"q": "hello", "a": "there"})
    stream = tokenize_documents(tok, [doc])
    assert stream.loss_mask.all() and len(stream) == len(tok.encode("Question: hello\n")) + len(tok.encode("there")) + 1


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_chat_mask_covers_assistant_turns_only(tok: AvaTokenizer, template: str):
    doc = render(chat_source(template), {"messages": CHAT})
    stream = tokenize_documents(tok, [doc])
    mask = stream.loss_mask.astype(bool)
    assert mask.sum() == _trained_token_count(tok, doc) + 1  # + EOS: the last turn is the assistant's
    end = "<|im_end|>\n" if template == "chatml" else "\n"
    assert tok.decode(stream.tokens[mask].tolist()) == f"Four.{end}Six.{end}<|endoftext|>"
    assert tok.decode(stream.tokens.tolist(), skip_special_tokens=True) == doc.text


def test_chat_train_on_all_masks_nothing(tok: AvaTokenizer):
    stream = tokenize_documents(tok, [render(chat_source(train_on="all"), {"messages": CHAT})])
    assert stream.loss_mask.all()


def test_labels_from_the_mask_are_exactly_the_response_tokens(tok: AvaTokenizer):
    source = template_source("Question: {q}\nAnswer: ", "{a}")
    docs = [render(source, {"q": "what is two plus two?", "a": "Four."}),
            render(source, {"q": "the lazy dog?", "a": "The quick brown fox."})]
    stream = tokenize_documents(tok, docs)
    labels = stream.tokens.astype(np.int64)
    labels[stream.loss_mask == 0] = IGNORE_INDEX
    expected = tok.encode("Four.") + [tok.eos_id] + tok.encode("The quick brown fox.") + [tok.eos_id]
    assert labels[labels != IGNORE_INDEX].tolist() == expected
    # the prompt positions are ignored, the inputs still hold every token
    prompt_tokens = sum(len(tok.encode(doc.segments[0][0])) for doc in docs)
    assert (labels == IGNORE_INDEX).sum() == prompt_tokens
    assert stream.doc_starts.tolist() == [0, len(tok.encode(docs[0].segments[0][0])) + len(tok.encode("Four.")) + 1]
