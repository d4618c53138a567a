"""`.keras` files with an edited config fail to load with our message first
(naming the layer and the entry), and config / weights disagreement names
the product and the weight. Compressed models load with safe_mode=True."""

import json
import zipfile

import numpy as np
import pytest

import keras_antman as am
from keras_antman._keras import keras

from conftest import randomize_weights


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "ok.keras"
    inp = keras.Input((5, 8))
    h = am.StructuredLSTM(8, input_scheme=am.LGPShuffle(2),
                          recurrent_scheme=am.LowRank(2), name="lstm_a")(inp)
    model = keras.Model(inp, keras.layers.Dense(3)(h))
    randomize_weights(model, seed=4)
    model.save(path)
    return path, model


def _edited(path, out, edit):
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    layer = next(x["config"] for x in config["config"]["layers"]
                 if x["class_name"] == "StructuredLSTM")
    edit(layer)
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out


def _groups(value):
    return lambda c: c["input_scheme"]["config"].update(groups=value)


@pytest.mark.parametrize("edit,pattern", [
    (_groups(0), r"^StructuredLSTM 'lstm_a': `input_scheme` of its config is "
                 r"invalid: LGPShuffle: `groups` must be a positive integer"),
    (_groups(-3), r"^StructuredLSTM 'lstm_a': .*Received: groups=-3"),
    (lambda c: c["input_scheme"]["config"].pop("groups"),
     r"^StructuredLSTM 'lstm_a': `input_scheme` .*Invalid LGPShuffle config"
     r".*missing 1 required positional argument: 'groups'"),
    (lambda c: c["input_scheme"].update(class_name="Nope",
                                        registered_name="keras_antman>Nope"),
     r"^StructuredLSTM 'lstm_a': .*Unknown scheme 'keras_antman>Nope'.*"
     r"Known: \[.*'LGPShuffle'"),
    (lambda c: c["recurrent_scheme"]["config"].update(rank=3),
     r"^StructuredLSTM 'lstm_a': `recurrent_scheme` .*exactly one of "
     r"`rank_reduction`"),
    (_groups(3), r"^`lstm_a: input product`: LGPShuffle\(groups=3\) cannot "
                 r"compress a 8 -> 32 product"),
])
def test_edited_config_fails_with_our_message_first(saved, tmp_path, edit,
                                                     pattern):
    path = _edited(saved[0], tmp_path / "edited.keras", edit)
    with pytest.raises(ValueError, match=pattern) as info:
        keras.models.load_model(path)
    assert len(str(info.value)) < 700  # ours, not Keras's generic dump


def test_config_and_weights_disagreeing_names_product_and_weight(saved,
                                                                 tmp_path):
    path = _edited(saved[0], tmp_path / "g4.keras", _groups(4))
    with pytest.raises(ValueError) as info:
        keras.models.load_model(path)
    message = str(info.value)
    assert "`lstm_a: input product`: the saved weights do not fit the " \
           "config's LGPShuffle(groups=4)" in message
    assert "['blocks'] of shapes [(4, 2, 8)]" in message
    assert "the file holds shapes [(2, 4, 16)]" in message


def test_compressed_model_loads_in_safe_mode(saved, rng):
    path, model = saved
    restored = keras.models.load_model(path, safe_mode=True)
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    np.testing.assert_array_equal(restored(x), model(x))
