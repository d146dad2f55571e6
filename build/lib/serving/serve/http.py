"""HTTP/JSON beside gRPC, on the same deployment (FastAPI: Ray Serve's own HTTP ingress).

  POST /v1/predict    a PredictRequest as JSON      -> PredictResponse
  POST /v1/annotate   AnnotateRequest               -> AnnotateResponse
  POST /v1/embed      EmbedRequest                  -> EmbedResponse
  GET  /v1/adapters                                 -> ListAdaptersResponse
  GET  /v1/health/live, /v1/health/ready            (no token: for probes)
  GET  /docs, /openapi.json

One source of truth, the proto: bodies are its messages in protobuf's JSON mapping (field names
as in protos/, or their lowerCamelCase; int64 values as strings; unknown fields refused). An HTTP
call runs the very gRPC method, on a context that carries its bearer token and collects the status,
so auth, limits, metrics and batches are the same (a JSON request and a gRPC request for one
adapter share a forward pass); the status maps to HTTP as in HTTP_STATUS (Google's API mapping).
"""
from __future__ import annotations

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from esm_adapters.v1 import adapters_pb2 as pb

MAX_BODY = 4 * 2**20  # as gRPC's default message limit
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}  # anything else (INTERNAL, UNKNOWN, DATA_LOSS): 500


def json_schema(descriptor, depth: int = 0) -> dict:
    """A message's JSON Schema in protobuf's JSON mapping, from its descriptor (for /docs)."""
    scalar = {FieldDescriptor.TYPE_STRING: {"type": "string"}, FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
              FieldDescriptor.TYPE_FLOAT: {"type": "number"}, FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
              FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
              FieldDescriptor.TYPE_INT32: {"type": "integer"}}
    properties = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            properties[field.name] = {"type": "object",
                                      "additionalProperties": scalar[field.message_type.fields_by_name["value"].type]}
            continue
        item = json_schema(field.message_type, depth + 1) if field.message_type is not None else dict(scalar[field.type])
        properties[field.name] = {"type": "array", "items": item} if field.is_repeated else item
    return {"type": "object", "title": descriptor.name, "properties": properties, "additionalProperties": False}


def body_of(message_type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": json_schema(message_type.DESCRIPTOR)}}}}


def answer_of(message_type) -> dict:
    return {200: {"description": "OK", "content": {"application/json": {"schema": json_schema(message_type.DESCRIPTOR)}}},
            **{status: {"description": meaning} for status, meaning in (
                (400, "INVALID_ARGUMENT or FAILED_PRECONDITION: a bad request, or a refused adapter"),
                (401, "UNAUTHENTICATED"), (404, "NOT_FOUND"), (413, "body over 4 MiB"),
                (429, "RESOURCE_EXHAUSTED: over a limit"), (503, "UNAVAILABLE"), (504, "DEADLINE_EXCEEDED"))}}


api = FastAPI(title="esm-adapters", version="1",
              description="ESM-2 task adapters served from one shared base. The bodies are the messages of "
                          "protos/esm_adapters/v1/adapters.proto in protobuf's JSON mapping; send "
                          "`Authorization: Bearer <token>` when the service has one.")


class HttpContext:
    """What a gRPC method reads and writes on its context, for a call that came over HTTP."""

    def __init__(self, request: Request):
        self.metadata = tuple((key, value) for key, value in request.headers.items() if key == "authorization")
        self.code, self.details, self.trailing = grpc.StatusCode.OK, "", ()

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, metadata):
        self.trailing = tuple(metadata)


def error(code: grpc.StatusCode, message: str) -> JSONResponse:
    return JSONResponse({"code": code.name, "message": message}, status_code=HTTP_STATUS.get(code, 500))


async def call(method, message_type, request: Request) -> JSONResponse:
    """Parse the body into `message_type`, run the gRPC `method`, answer its message or its status."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        return JSONResponse({"code": "RESOURCE_EXHAUSTED", "message": f"body over {MAX_BODY} bytes"}, status_code=413)
    body = b""
    async for chunk in request.stream():  # a body without a length is counted as it arrives
        body += chunk
        if len(body) > MAX_BODY:
            return JSONResponse({"code": "RESOURCE_EXHAUSTED", "message": f"body over {MAX_BODY} bytes"},
                                status_code=413)
    try:
        message = json_format.Parse(body or b"{}", message_type())
    except (json_format.ParseError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return error(grpc.StatusCode.INVALID_ARGUMENT, f"the body is not a {message_type.DESCRIPTOR.name} in JSON: "
                                                       f"{str(exc)[:300]}")
    context = HttpContext(request)
    response = await method(message, context)
    if context.code != grpc.StatusCode.OK:
        return error(context.code, context.details)
    timing = {"Server-Timing": ", ".join(f"{key.split('-')[1]};dur={value}" for key, value in context.trailing)} \
        if context.trailing else {}
    return JSONResponse(json_format.MessageToDict(response, preserving_proto_field_name=True,
                                                  always_print_fields_with_no_presence=True), headers=timing)


class HttpFront:
    """The HTTP routes, mixed into the deployment class (serving/serve/app.py), whose gRPC methods
    they call."""

    @api.post("/v1/predict", openapi_extra=body_of(pb.PredictRequest), responses=answer_of(pb.PredictResponse),
              summary="Run one adapter over sequences")
    async def http_predict(self, request: Request):
        return await call(self.Predict, pb.PredictRequest, request)

    @api.post("/v1/annotate", openapi_extra=body_of(pb.AnnotateRequest), responses=answer_of(pb.AnnotateResponse),
              summary="Several adapters over the same sequences")
    async def http_annotate(self, request: Request):
        return await call(self.Annotate, pb.AnnotateRequest, request)

    @api.post("/v1/embed", openapi_extra=body_of(pb.EmbedRequest), responses=answer_of(pb.EmbedResponse),
              summary="Embeddings from the bare base")
    async def http_embed(self, request: Request):
        return await call(self.Embed, pb.EmbedRequest, request)

    @api.get("/v1/adapters", responses=answer_of(pb.ListAdaptersResponse), summary="Every adapter version")
    async def http_adapters(self, request: Request):
        context = HttpContext(request)
        response = await self.ListAdapters(pb.ListAdaptersRequest(), context)
        if context.code != grpc.StatusCode.OK:
            return error(context.code, context.details)
        return JSONResponse(json_format.MessageToDict(response, preserving_proto_field_name=True,
                                                      always_print_fields_with_no_presence=True))

    @api.get("/v1/health/live", summary="The replica answers (no token)")
    async def http_live(self):
        return {"status": "live"}

    @api.get("/v1/health/ready", summary="The replica is warm and serving (no token); a registry problem is "
                                         "reported, never a failure")
    async def http_ready(self):
        return {"status": "ready", "registry_problem": self.engine.registry.problem or ""}
