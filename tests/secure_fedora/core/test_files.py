"""Strict JSON: non-finite figures are null, each named by an unambiguous JSON Pointer."""

import json

import pytest

from secure_fedora.core.files import (
    NON_FINITE_KEY,
    finite_document,
    json_pointer,
    json_pointer_tokens,
    strict_json,
)


def test_a_dotted_key_is_not_read_as_nesting():
    """The path of a NaN under the key "a.b" was "a.b", the same as under {"a": {"b": ...}}
    (and a key "x[0]" read like a list index); each path is now a JSON Pointer."""
    doc = {"a.b": float("nan"), "a": {"b": float("inf")}, "x[0]": [float("-inf")],
           "x": [float("nan")], "k/~": float("nan")}
    found = json.loads(strict_json(doc))[NON_FINITE_KEY]
    assert found == {"/a.b": "nan", "/a/b": "inf", "/x[0]/0": "-inf", "/x/0": "nan",
                     "/k~1~0": "nan"}
    for pointer in found:  # each pointer leads back to the null it names
        value = json.loads(strict_json(doc))
        for token in json_pointer_tokens(pointer):
            value = value[int(token)] if isinstance(value, list) else value[token]
        assert value is None


def test_pointers_round_trip_and_a_finite_document_is_unchanged():
    for tokens in ([], ["a"], ["a.b", 0, "c/d~e", ""], ["~1", "/0"]):
        assert json_pointer_tokens(json_pointer(tokens)) == [str(t) for t in tokens]
    with pytest.raises(ValueError, match="not a JSON Pointer"):
        json_pointer_tokens("a.b")
    assert finite_document({"a": [1.0, 2], "b": None}) == {"a": [1.0, 2], "b": None}
