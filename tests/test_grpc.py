"""The gRPC front end: the stock tritonclient.grpc and grpc.health.v1 clients against a real
server, its answers against Keras's own, and the hostile cases.

The module's server serves every version (1 and 2) of the reference model, asks for a
token on ModelInfer, and has small limits (4 request threads, a 1 MB message), so that the
hostile cases meet them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.conftest import (
    LABELS,
    distinct_images,
    expected_probabilities,
    free_port,
    make_cnn,
    start_server,
)
from tests.grpc_raw import idle_connection, stalled_call, unfinished_call
from tests.load import samples, scrape

pytestmark = pytest.mark.slow

TOKEN = "grpc-s3cret"
BEARER = [("authorization", f"Bearer {TOKEN}")]
INFER = "/inference.GRPCInferenceService/ModelInfer"
THREADS = 4
MAX_BODY_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    """Start one real server, gRPC on a port of its own, for the module's tests."""
    grpc_port = free_port()
    started = start_server(
        model_dir,
        tmp_path_factory.mktemp("grpc-server"),
        GRPC_PORT=str(grpc_port),
        MODEL_VERSION_POLICY="all",
        API_TOKEN=TOKEN,
        THREADS=str(THREADS),
        MAX_BODY_BYTES=str(MAX_BODY_BYTES),
    )
    started.grpc_port = grpc_port  # type: ignore[attr-defined]
    yield started
    started.stop()


@pytest.fixture
def triton(server):
    """Return a stock tritonclient gRPC client of the real server."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


@pytest.fixture
def stub(server):
    """Return a plain generated stub of GRPCInferenceService over its own channel."""
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def pixels(count: int, seed: int = 0) -> np.ndarray:
    """Return random uint8 images at the model's input size."""
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def keras_output(model, batch: np.ndarray) -> np.ndarray:
    """Return the Keras model's own output on uint8 pixels scaled by 1/255."""
    return np.asarray(model(batch.astype(np.float32) / 255.0, training=False))


def image_request(images: list[bytes], model: str = "shapes", **fields) -> pb.ModelInferRequest:
    """Return a ModelInferRequest of encoded images as typed BYTES contents."""
    request = pb.ModelInferRequest(model_name=model, **fields)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
    tensor.contents.bytes_contents.extend(images)
    return request


def rest_error(server, body: dict) -> str:
    """Return the message the REST V2 route answers `body` with (its 4xx)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = requests.post(
        server.url + "/v2/models/shapes/infer", json=body, headers=headers, timeout=30
    )
    assert 400 <= response.status_code < 500, response.text
    return response.json()["error"]


def grpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """Return the RpcError a call ends with."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


# -- the stock clients ------------------------------------------------------------------


def test_health_and_metadata_through_tritonclient(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("shapes")
    assert triton.is_model_ready("shapes", "1")
    assert not triton.is_model_ready("shapes", "9")
    server = triton.get_server_metadata()
    assert server.name == "cnn-serving"
    assert {"binary_tensor_data", "classification"} <= set(server.extensions)
    metadata = triton.get_model_metadata("shapes")
    assert (metadata.name, metadata.platform) == ("shapes", "keras")
    assert sorted(metadata.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("image", "BYTES", [-1]),
        ("pixels", "UINT8", [-1, 32, 32, 3]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("probabilities", "FP32", [-1, 3])
    ]
    assert list(triton.get_model_metadata("shapes", "1").versions) == ["1"]
    index = triton.get_model_repository_index()
    assert sorted((m.name, m.version, m.state) for m in index.models) == [
        ("shapes", "1", "READY"),
        ("shapes", "2", "READY"),
    ]


def test_raw_image_bytes_answer_the_models_own_output(triton, cnn, classifier):
    import tritonclient.grpc as grpcclient

    images = distinct_images(3)
    tensor = grpcclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    result = triton.infer("shapes", [tensor], request_id="req-9", headers=dict(BEARER))
    expected = [expected_probabilities(cnn, data, classifier.info.spec) for data in images]
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-9", "shapes", "2")


def test_raw_uint8_and_fp32_pixels_answer_the_models_own_output(triton, cnn):
    import tritonclient.grpc as grpcclient

    batch = pixels(2, seed=5)
    tensor = grpcclient.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    got = triton.infer("shapes", [tensor], headers=dict(BEARER)).as_numpy("probabilities")
    np.testing.assert_allclose(got, keras_output(cnn, batch), atol=1e-5)
    values = batch.astype(np.float32) / 255.0  # FP32 is taken as the model's input values
    tensor = grpcclient.InferInput("pixels", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(values)
    got = triton.infer("shapes", [tensor], headers=dict(BEARER)).as_numpy("probabilities")
    np.testing.assert_allclose(got, np.asarray(cnn(values, training=False)), atol=1e-5)


def test_typed_contents_are_answered_in_typed_contents(stub, cnn, classifier):
    images = distinct_images(2)
    response = stub.ModelInfer(image_request(images), metadata=BEARER)
    [output] = response.outputs
    assert not response.raw_output_contents
    assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "FP32", [2, 3])
    expected = [expected_probabilities(cnn, data, classifier.info.spec) for data in images]
    got = np.asarray(output.contents.fp32_contents).reshape(2, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    batch = pixels(1, seed=3)
    request = pb.ModelInferRequest(model_name="shapes")
    tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=list(batch.shape))
    tensor.contents.uint_contents.extend(batch.ravel().tolist())
    got = np.asarray(stub.ModelInfer(request, metadata=BEARER).outputs[0].contents.fp32_contents)
    np.testing.assert_allclose(got.reshape(1, 3), keras_output(cnn, batch), atol=1e-5)


def test_classification_lists_the_top_classes_most_likely_first(triton, stub, cnn, classifier):
    import tritonclient.grpc as grpcclient

    # Images whose classes are not ranked in label order, so that the order is tested.
    candidates = distinct_images(40)
    expected = {d: expected_probabilities(cnn, d, classifier.info.spec) for d in candidates}
    images = [d for d in candidates if list(np.argsort(-expected[d])) != [0, 1, 2]][:2]
    assert len(images) == 2, "no image ranks its classes out of label order"
    tensor = grpcclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    output = grpcclient.InferRequestedOutput("probabilities", class_count=3)
    got = triton.infer("shapes", [tensor], outputs=[output], headers=dict(BEARER))
    typed = image_request(images)
    typed.outputs.add(name="probabilities").parameters["classification"].int64_param = 2
    top_two = stub.ModelInfer(typed, metadata=BEARER).outputs[0]
    assert list(top_two.shape) == [2, 2]
    rows = got.as_numpy("probabilities")
    for i, (row, data) in enumerate(zip(rows, images, strict=True)):
        fields = [element.decode().split(":") for element in row]
        order = np.argsort(-expected[data], kind="stable")
        assert [int(index) for _, index, _ in fields] == list(order)
        assert [label for _, _, label in fields] == [LABELS[k] for k in order]
        np.testing.assert_allclose(
            [float(v) for v, _, _ in fields], expected[data][order], atol=1e-5
        )
        assert list(top_two.contents.bytes_contents[2 * i : 2 * i + 2]) == list(row[:2])


def test_a_pinned_version_answers_with_that_versions_model(triton, model_dir):
    import tritonclient.grpc as grpcclient

    batch = pixels(2, seed=11)
    tensor = grpcclient.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    pinned = triton.infer("shapes", [tensor], model_version="1", headers=dict(BEARER))
    assert pinned.get_response().model_version == "1"
    version_one = make_cnn(seed=1)
    version_one.load_weights(model_dir / "1" / "model.weights.h5")
    np.testing.assert_allclose(
        pinned.as_numpy("probabilities"), keras_output(version_one, batch), atol=1e-5
    )
    latest = triton.infer("shapes", [tensor], headers=dict(BEARER))
    assert latest.get_response().model_version == "2"
    assert not np.allclose(latest.as_numpy("probabilities"), pinned.as_numpy("probabilities"))


def test_model_infer_needs_the_token_and_health_does_not(stub, server):
    request = image_request(distinct_images(1))
    for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
        error = grpc_error(stub.ModelInfer, request, metadata=metadata)
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED, metadata
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelMetadata(pb.ModelMetadataRequest(name="shapes")).name == "shapes"


def test_health_checks_the_server_and_each_model(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "inference.GRPCInferenceService", "shapes"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == serving
        error = grpc_error(health.Check, health_pb2.HealthCheckRequest(service="nope"))
        assert error.code() is grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == serving
        watch.cancel()
        unknown = health.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        unknown.cancel()
        listed = health.List(health_pb2.HealthListRequest()).statuses
        assert {name: s.status for name, s in listed.items()} == {
            "": serving,
            "inference.GRPCInferenceService": serving,
            "shapes": serving,
        }


def test_reflection_lists_and_describes_the_services(server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        infer = service.methods_by_name["ModelInfer"]
        assert infer.input_type.full_name == "inference.ModelInferRequest"


# -- the same rules as REST ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "body"),
    [
        (
            lambda r: setattr(r.inputs[0], "datatype", "INT32"),
            {"inputs": [{"name": "image", "datatype": "INT32", "shape": [1], "data": [1]}]},
        ),
        (
            lambda r: r.inputs[0].shape.extend([2]),
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 2], "data": ["x"]}]},
        ),
        (
            lambda r: setattr(r.inputs[0], "name", "photo"),
            {"inputs": [{"name": "photo", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
        ),
    ],
    ids=["datatype", "count", "name"],
)
def test_bad_tensors_are_invalid_argument_with_the_rest_message(stub, server, change, body):
    request = image_request([b"x"])
    change(request)
    error = grpc_error(stub.ModelInfer, request, metadata=BEARER)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == rest_error(server, body)


def test_wrong_pixel_shape_is_invalid_argument_with_the_rest_message(stub, server):
    request = pb.ModelInferRequest(model_name="shapes")
    tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 16, 16, 3])
    tensor.contents.uint_contents.extend([7] * (16 * 16 * 3))
    error = grpc_error(stub.ModelInfer, request, metadata=BEARER)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    body = {
        "inputs": [
            {"name": "pixels", "datatype": "UINT8", "shape": [1, 16, 16, 3], "data": [7] * 768}
        ]
    }
    assert error.details() == rest_error(server, body)


def test_bytes_that_are_no_image_are_invalid_argument_with_the_rest_message(stub, server):
    error = grpc_error(stub.ModelInfer, image_request([b"not an image"]), metadata=BEARER)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not an image"]}]
    }
    assert error.details() == rest_error(server, body)


def test_unknown_model_and_version_are_not_found(stub):
    for request in (
        image_request(distinct_images(1), model="nope"),
        image_request(distinct_images(1), model_version="9"),
    ):
        error = grpc_error(stub.ModelInfer, request, metadata=BEARER)
        assert error.code() is grpc.StatusCode.NOT_FOUND
    error = grpc_error(stub.ModelMetadata, pb.ModelMetadataRequest(name="nope"))
    assert error.code() is grpc.StatusCode.NOT_FOUND


def test_a_message_over_the_limit_is_resource_exhausted(stub, triton):
    big = image_request([b"\x00" * (MAX_BODY_BYTES + 1)])
    error = grpc_error(stub.ModelInfer, big, metadata=BEARER)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    too_many = image_request(distinct_images(1) * 65)  # MAX_IMAGES_PER_REQUEST is 64
    error = grpc_error(stub.ModelInfer, too_many, metadata=BEARER)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "65 images in one request; the limit is 64" in error.details()
    assert triton.is_server_ready()


def test_a_malformed_protobuf_is_invalid_argument(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        raw = channel.unary_unary(INFER)  # bytes in, bytes out: no serializer
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\x01abc", b"\x2a\x05\x0a\x03"):
            error = grpc_error(raw, garbage, metadata=BEARER, timeout=10)
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, garbage
            assert "not a valid inference.ModelInferRequest message" in error.details()


def test_errors_and_latency_are_counted_with_the_grpc_protocol(stub, server):
    def counted() -> tuple[float, float]:
        text = scrape(server.url)
        ok = samples(
            text,
            "cnn_http_request_duration_seconds_count",
            protocol="grpc",
            endpoint=INFER,
            status="OK",
        )
        errors = samples(text, "cnn_errors_total", code="invalid_image", protocol="grpc")
        return sum(ok), sum(errors)

    ok_before, errors_before = counted()
    stub.ModelInfer(image_request(distinct_images(1)), metadata=BEARER)
    grpc_error(stub.ModelInfer, image_request([b"junk"]), metadata=BEARER)
    ok_after, errors_after = counted()
    assert (ok_after, errors_after) == (ok_before + 1, errors_before + 1)


# -- many clients, and clients that misbehave ----------------------------------------------


def test_a_thousand_concurrent_streams_beside_a_checked_canary(server, cnn, classifier):
    images = distinct_images(3)
    expected = [expected_probabilities(cnn, d, classifier.info.spec) for d in images]
    target = f"127.0.0.1:{server.grpc_port}"
    with grpc.insecure_channel(target) as busy, grpc.insecure_channel(target) as quiet:
        flood = service_pb2_grpc.GRPCInferenceServiceStub(busy)
        canary = service_pb2_grpc.GRPCInferenceServiceStub(quiet)
        futures = [
            flood.ModelInfer.future(image_request([images[i % 3]]), metadata=BEARER, timeout=120)
            for i in range(1000)
        ]
        for _ in range(10):
            answer = canary.ModelInfer(image_request([images[0]]), metadata=BEARER, timeout=60)
            got = np.asarray(answer.outputs[0].contents.fp32_contents)
            np.testing.assert_allclose(got, expected[0], atol=1e-5)
        for i, future in enumerate(futures):
            got = np.asarray(future.result().outputs[0].contents.fp32_contents)
            np.testing.assert_allclose(got, expected[i % 3], atol=1e-5)


def test_clients_that_stop_reading_hold_no_request_thread(server, stub, cnn, classifier):
    request = image_request(distinct_images(1)).SerializeToString()
    # More stalled calls than request threads: each answer waits in grpcio's core for a
    # window that never opens, not in a thread.
    stalled = [stalled_call(server.grpc_port, INFER, request, BEARER) for _ in range(THREADS * 3)]
    try:
        time.sleep(0.5)  # let them arrive and be answered into the void
        data = distinct_images(2)[1]
        with ThreadPoolExecutor(THREADS * 2) as pool:
            answers = list(
                pool.map(
                    lambda _: stub.ModelInfer(image_request([data]), metadata=BEARER, timeout=30),
                    range(THREADS * 2),
                )
            )
        expected = expected_probabilities(cnn, data, classifier.info.spec)
        for answer in answers:
            got = np.asarray(answer.outputs[0].contents.fp32_contents)
            np.testing.assert_allclose(got, expected, atol=1e-5)
    finally:
        for sock in stalled:
            sock.close()


def test_explain_parameter_adds_each_images_gradcam(stub, cnn, classifier):
    import json

    images = distinct_images(2)
    request = image_request(images)
    request.parameters["explain"].string_param = "gradcam"
    response = stub.ModelInfer(request, metadata=BEARER)
    explained = json.loads(response.parameters["explanations"].string_param)
    expected = [expected_probabilities(cnn, d, classifier.info.spec) for d in images]
    assert [e["class"] for e in explained] == [LABELS[int(np.argmax(p))] for p in expected]
    assert {e["method"] for e in explained} == {"gradcam"}
    request.parameters["explain"].string_param = "lime"
    error = grpc_error(stub.ModelInfer, request, metadata=BEARER)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_thousands_of_idle_and_slow_clients_starve_no_one(server, stub, cnn, classifier):
    request = image_request(distinct_images(1)).SerializeToString()
    sockets = [idle_connection(server.grpc_port) for _ in range(2000)]
    # Calls whose message never finishes arriving: none reaches a request thread.
    sockets += [
        unfinished_call(server.grpc_port, INFER, request, BEARER) for _ in range(THREADS * 50)
    ]
    try:
        data = distinct_images(3)[2]
        expected = expected_probabilities(cnn, data, classifier.info.spec)
        for _ in range(10):
            answer = stub.ModelInfer(image_request([data]), metadata=BEARER, timeout=30)
            got = np.asarray(answer.outputs[0].contents.fp32_contents)
            np.testing.assert_allclose(got, expected, atol=1e-5)
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            status = check(health_pb2.HealthCheckRequest(service=""), timeout=30).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for sock in sockets:
            sock.close()
