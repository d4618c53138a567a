"""The Distiller and `calibrate_coefficients` under TensorFlow's
multi-machine engine, `tf.distribute.MultiWorkerMirroredStrategy`: two
worker processes on 127.0.0.1 (`TF_CONFIG`) match one process to 1e-5."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf
    from keras_antman._keras import keras
    from keras_antman.distill import Distiller, calibrate_coefficients

    out = sys.argv[1]
    strategy = (tf.distribute.MultiWorkerMirroredStrategy()
                if "TF_CONFIG" in os.environ else
                tf.distribute.get_strategy())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4, 3)).astype("float32")
    y = rng.integers(0, 6, size=(64, 4))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    with strategy.scope():
        keras.utils.set_random_seed(0)
        make = lambda h: keras.Sequential([
            keras.Input((4, 3)), keras.layers.LSTM(h, return_sequences=True),
            keras.layers.Dense(6)])
        student, teacher = make(3), make(8)
        coefficients = calibrate_coefficients(
            student, teacher, data, epochs=1, optimizer="sgd")
        d = Distiller(student=student, teacher=teacher)
        d.compile(keras.optimizers.SGD(0.5), c_mse=2.0, c_kl=3.0)
    initial = student.get_weights()
    history = d.fit(data, epochs=2, verbose=0)
    json.dump({
        "replicas": strategy.num_replicas_in_sync,
        "losses": {k: v for k, v in history.history.items()},
        "coefficients": coefficients.compile_kwargs(),
        "moved": max(float(np.abs(a - b).max())
                     for a, b in zip(initial, student.get_weights())),
        "weights": [w.tolist() for w in student.get_weights()],
    }, open(out, "w"))
""")


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_match_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "single.json")],
        env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    cluster = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    workers = []
    for index in range(2):
        config = {"cluster": {"worker": cluster},
                  "task": {"type": "worker", "index": index}}
        workers.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"w{index}.json")],
            env=dict(env, TF_CONFIG=json.dumps(config)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]

    one = json.loads((tmp_path / "single.json").read_text())
    assert one["replicas"] == 1 and one["moved"] > 1e-3
    for index in range(2):
        many = json.loads((tmp_path / f"w{index}.json").read_text())
        assert many["replicas"] == 2
        assert many["coefficients"] == one["coefficients"]
        for name, values in one["losses"].items():
            np.testing.assert_allclose(many["losses"][name], values,
                                       rtol=1e-5, err_msg=name)
        assert len(many["weights"]) == len(one["weights"])
        for a, b in zip(many["weights"], one["weights"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
