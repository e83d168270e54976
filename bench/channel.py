"""The channel between workers and runners: the round trip of uint8 tensors, by transport.

Measures what choosing the channel rests on (issue 21): a worker sends one 32x32x3, one
224x224x3 and sixteen 32x32x3 images to another process, which answers with their class
probabilities (N x 10 float32), over
- zmq: pyzmq DEALER/ROUTER over ipc://, the tensor as a raw frame sent without a copy in
  Python (the service's channel, service/channel/wire.py);
- zmq+shm: the tensor written into a multiprocessing.shared_memory slot, only a header over
  the same sockets (PyTriton's way);
- pipe+pickle: multiprocessing.Connection with the array pickled, the naive choice.

Run: python bench/channel.py [--rounds N]. Prints the median and p99 round trip per size.
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import statistics
import time
from multiprocessing import shared_memory

import numpy as np
import orjson
import zmq

SIZES = {
    "1 x 32x32x3": (1, 32, 32, 3),
    "1 x 224x224x3": (1, 224, 224, 3),
    "16 x 32x32x3": (16, 32, 32, 3),
}
CLASSES = 10
SLOT_BYTES = 16 * 224 * 224 * 3


def answer(tensor: np.ndarray) -> np.ndarray:
    """What the runner sends back: probabilities, after reading the images once."""
    probabilities = np.full((len(tensor), CLASSES), 1.0 / CLASSES, dtype=np.float32)
    probabilities[:, 0] += float(tensor[:, 0, 0, 0].sum()) * 0.0
    return probabilities


def serve_zmq(address: str, shm_name: str | None) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.bind(address)
    slot = shared_memory.SharedMemory(shm_name) if shm_name else None
    while True:
        frames = sock.recv_multipart(copy=False)
        header = orjson.loads(frames[1].bytes)
        if header.get("stop"):
            break
        shape = tuple(header["shape"])
        if slot is not None:
            tensor = np.ndarray(shape, np.uint8, buffer=slot.buf)
        else:
            tensor = np.frombuffer(frames[2].buffer, np.uint8).reshape(shape)
        out = answer(tensor)
        del tensor
        sock.send_multipart([frames[0], orjson.dumps({"shape": out.shape}), out], copy=False)
    if slot is not None:
        slot.close()
    sock.close(0)
    context.term()


def serve_pipe(connection) -> None:
    while True:
        message = connection.recv_bytes()
        tensor = pickle.loads(message)
        if tensor is None:
            break
        connection.send_bytes(pickle.dumps(answer(tensor), protocol=5))


def time_zmq(rounds: int, use_shm: bool) -> dict[str, list[float]]:
    address = f"ipc://@cnn-serving-bench-channel-{time.monotonic_ns()}"
    slot = shared_memory.SharedMemory(create=True, size=SLOT_BYTES) if use_shm else None
    server = multiprocessing.Process(
        target=serve_zmq, args=(address, slot.name if slot else None), daemon=True
    )
    server.start()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(address)
    times: dict[str, list[float]] = {}
    try:
        for label, shape in SIZES.items():
            tensor = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
            header = orjson.dumps({"shape": shape})
            samples = []
            for i in range(rounds + 20):
                started = time.perf_counter()
                if slot is not None:
                    # The decoder's output written into the slot: the one copy of this path.
                    np.copyto(np.ndarray(shape, np.uint8, buffer=slot.buf), tensor)
                    sock.send_multipart([header])
                else:
                    sock.send_multipart([header, tensor], copy=False)
                frames = sock.recv_multipart(copy=False)
                np.frombuffer(frames[1].buffer, np.float32)
                if i >= 20:
                    samples.append(time.perf_counter() - started)
            times[label] = samples
        sock.send_multipart([orjson.dumps({"stop": True})])
    finally:
        server.join(10)
        sock.close(0)
        context.term()
        if slot is not None:
            slot.close()
            slot.unlink()
    return times


def time_pipe(rounds: int) -> dict[str, list[float]]:
    ours, theirs = multiprocessing.Pipe()
    server = multiprocessing.Process(target=serve_pipe, args=(theirs,), daemon=True)
    server.start()
    times: dict[str, list[float]] = {}
    for label, shape in SIZES.items():
        tensor = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        samples = []
        for i in range(rounds + 20):
            started = time.perf_counter()
            ours.send_bytes(pickle.dumps(tensor, protocol=5))
            pickle.loads(ours.recv_bytes())
            if i >= 20:
                samples.append(time.perf_counter() - started)
        times[label] = samples
    ours.send_bytes(pickle.dumps(None))
    server.join(10)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    results = {
        "zmq": time_zmq(args.rounds, use_shm=False),
        "zmq+shm": time_zmq(args.rounds, use_shm=True),
        "pipe+pickle": time_pipe(args.rounds),
    }
    print(f"round trip, microseconds (median / p99), {args.rounds} rounds each")
    print(f"{'transport':<12}" + "".join(f"{label:>22}" for label in SIZES))
    for transport, times in results.items():
        cells = []
        for label in SIZES:
            samples = sorted(times[label])
            p99 = samples[int(0.99 * (len(samples) - 1))]
            cells.append(f"{statistics.median(samples) * 1e6:>10.1f} / {p99 * 1e6:>8.1f}")
        print(f"{transport:<12}" + "".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
