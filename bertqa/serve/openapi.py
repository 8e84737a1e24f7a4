"""The OpenAPI 3.1 document of the endpoint (GET /openapi.json), with the limits of one ServeConfig."""
from __future__ import annotations

from typing import Any

from .._version import __version__
from .settings import ServeConfig


def openapi_spec(config: ServeConfig) -> dict[str, Any]:
    record_common = {
        "context": {"type": "string", "minLength": 1, "pattern": r"\S",
                    "description": "text to find the answer in; windows of max_seq_length tokens, "
                                   "doc_stride apart, cover it whole"},
        "top_k": {"type": ["integer", "null"], "minimum": 1, "maximum": config.n_best_size,
                  "description": "return a list of the top_k answers instead of one answer (null: one answer)"},
        "max_answer_length": {"type": ["integer", "null"], "minimum": 1, "maximum": config.max_seq_length,
                              "description": f"longest answer in tokens (null or absent: "
                                             f"{config.max_answer_length})"},
    }
    question = {"type": "string", "minLength": 1, "pattern": r"\S"}
    single = {"type": "object", "required": ["question", "context"],
              "properties": {"question": question, **record_common}}
    multi = {"type": "object", "required": ["questions", "context"],
             "properties": {"questions": {"type": "array", "items": question, "minItems": 1,
                                          "maxItems": config.max_questions}, **record_common}}
    answer = {"type": "object", "required": ["answer", "score", "start", "end"], "properties": {
        "answer": {"type": "string", "description": "context[start:end]"},
        "score": {"type": "number", "description": "probability among the n-best spans"},
        "start": {"type": "integer", "description": "first character of the answer in the context"},
        "end": {"type": "integer", "description": "one past the last character"}}}
    error = {"type": "object", "required": ["error", "status"],
             "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    err = lambda text: {"description": text, "content": {"application/json": {"schema": ref("Error")}}}  # noqa: E731
    limits = (f"Limits: body {config.max_payload_mb:g} MB (413), {config.max_questions} questions and "
              f"{config.max_windows} windows of {config.max_seq_length} tokens per request (413), "
              f"{config.timeout_s:g} s per request (504); headers within {config.header_timeout_s:g} s of their "
              f"first byte and the body within {config.body_timeout_s:g} s of the headers (408).")
    return {
        "openapi": "3.1.0",
        "info": {"title": "bertqa question answering endpoint", "version": __version__,
                 "description": "Extractive question answering with a BERT model, behind the SageMaker "
                                "inference contract. " + limits},
        "paths": {
            "/ping": {"get": {"summary": "health check", "responses": {
                "200": {"description": "the model is loaded (empty body)"},
                "503": err("the model is still loading, or failed to load")}}},
            "/invocations": {"post": {
                "summary": "answer questions about contexts",
                "description": "A record, an array of records, or {\"instances\": [records]}; with "
                               "application/jsonlines, one record per line. " + limits,
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"oneOf": [
                        ref("Record"), ref("MultiQuestionRecord"),
                        {"type": "array", "minItems": 1, "maxItems": config.max_questions, "items": ref("AnyRecord")},
                        {"type": "object", "required": ["instances"], "properties": {
                            "instances": {"type": "array", "minItems": 1, "maxItems": config.max_questions,
                                          "items": ref("AnyRecord")}}}]}},
                    "application/jsonlines": {"schema": ref("AnyRecord")}}},
                "responses": {
                    "200": {"description": "one answer per question (a list of top_k answers when top_k is "
                                           "given); arrays mirror the request",
                            "content": {"application/json": {"schema": {"oneOf": [
                                ref("Answer"), {"type": "array"}]}},
                                "application/jsonlines": {"schema": {}}}},
                    "400": err("malformed JSON or UTF-8; a missing, empty or wrongly typed field"),
                    "406": err("Accept names a type the server does not produce"),
                    "408": err("the body did not arrive within the body timeout (BERTQA_BODY_TIMEOUT)"),
                    "413": err("body, questions or windows over the limits"),
                    "415": err("Content-Type other than application/json or application/jsonlines"),
                    "503": err("model not loaded yet, or too many windows queued"),
                    "504": err("no answer within the timeout")}}},
            "/execution-parameters": {"get": {"summary": "batch transform parameters", "responses": {
                "200": {"description": "MaxConcurrentTransforms, BatchStrategy, MaxPayloadInMB",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/stats": {"get": {"summary": "dynamic batching statistics", "responses": {
                "200": {"description": "device, precision (once loaded), engine calls, windows, batch size "
                                       "histogram, engine threads (CPU)",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/openapi.json": {"get": {"summary": "this description", "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {}}}}}}},
            "/": {"get": {"summary": "a page to ask a question in a browser", "responses": {
                "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": {
            "Record": single, "MultiQuestionRecord": multi,
            "AnyRecord": {"oneOf": [ref("Record"), ref("MultiQuestionRecord")]},
            "Answer": answer, "Error": error}},
    }
