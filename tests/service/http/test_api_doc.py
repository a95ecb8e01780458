"""docs/api.md, the project's HTTP contract, against what the service serves: every operation of the
OpenAPI schema, every field of its request and response bodies, every error type and the v2
tensors and parameters are named in it, and the fields added since the schema had descriptions
carry theirs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from service import errors
from service.http import v2_tensors
from service.process.app import create_app
from service.settings import Settings

DOC = Path(__file__).resolve().parents[3] / "docs" / "api.md"
# The bodies a client sends and reads: each with every schema it refers to.
BODIES = ("TaskCreate", "ExamplesAdd", "ClassifyRequest", "ClassifyOnceRequest", "TaskPublic", "TasksPublic",
          "ClassifyResponse", "ModelPublic", "ErrorPublic")
DESCRIBED = {  # fields added with these descriptions: a client reads the contract from them
    "ClassifyRequest": ("min_confidence",), "ClassifyOnceRequest": ("min_confidence",),
    "Prediction": ("label", "confidence", "support_similarity"), "TaskPublic": ("warnings",),
    "MisclassifiedExample": ("message",), "IndistinguishableExamples": ("message",),
    "MisclassifiedDetails": ("example_index", "label", "predicted_label", "confidence"),
    "IndistinguishableDetails": ("example_indices", "labels", "cosine"),
}


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("doc")))  # no lifespan: no model
    return app.openapi()


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def named(doc: str, name: str) -> bool:
    """`name` in code, or "name" as a JSON key of an example."""
    return f"`{name}`" in doc or f'"{name}"' in doc


def schemas_of(schema: dict[str, Any], names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The named component schemas and every component schema they refer to, by name."""
    components = schema["components"]["schemas"]
    found: dict[str, dict[str, Any]] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in found:
            found[name] = components[name]
            todo += re.findall(r"#/components/schemas/(\w+)", repr(components[name]))
    return found


def test_every_operation_of_the_schema_is_in_the_contract(schema: dict[str, Any], doc: str) -> None:
    operations = [f"{method.upper()} {path}" for path, methods in schema["paths"].items()
                  for method in methods]
    assert len(operations) == 11
    assert [op for op in operations if f"`{op}`" not in doc] == []


def test_every_field_of_the_request_and_response_bodies_is_in_the_contract(
    schema: dict[str, Any], doc: str,
) -> None:
    bodies = schemas_of(schema, BODIES)
    assert {"Prediction", "LabelProbability", "AttentionWeight", "MisclassifiedExample",
            "IndistinguishableDetails"} <= set(bodies)
    missing = [f"{name}.{field}" for name, body in bodies.items() for field in body.get("properties", {})
               if not named(doc, field)]
    assert missing == []


def test_the_warning_types_and_the_fields_added_since_are_described(schema: dict[str, Any], doc: str) -> None:
    components = schema["components"]["schemas"]
    undescribed = [f"{name}.{field}" for name, fields in DESCRIBED.items() for field in fields
                   if not components[name]["properties"][field].get("description")]
    assert undescribed == []
    types = [components[name]["properties"]["type"]["const"]
             for name in ("MisclassifiedExample", "IndistinguishableExamples")]
    assert types == ["misclassified_example", "indistinguishable_examples"]
    assert all(named(doc, t) for t in types)


def test_every_error_type_a_client_can_get_is_in_the_contract(doc: str) -> None:
    types = {cls.type for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.ServiceError)}
    # a bug's answer; one nobody is left to read; the parent of 413's two types
    never_sent = {"internal_error", "client_disconnected", "payload_too_large"}
    assert [t for t in sorted(types - never_sent) if not named(doc, t)] == []


def test_the_v2_inputs_outputs_and_parameters_are_in_the_contract(doc: str) -> None:
    names = [v2_tensors.IMAGE, v2_tensors.PIXELS, *v2_tensors.OUTPUTS, v2_tensors.MIN_CONFIDENCE]
    assert [name for name in names if not named(doc, name)] == []


def test_the_contract_ends_with_its_changelog_naming_the_latest_additions(doc: str) -> None:
    changelog = doc.split("\n## Changelog\n")[-1]
    assert "\n## " not in changelog  # the last section
    for added in ("support_similarity", "SUPPORT_SIMILARITY", "min_confidence", "warnings",
                  "misclassified_example", "indistinguishable_examples"):
        assert f"`{added}`" in changelog, added
