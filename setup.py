"""Build hook: compiles the custom op against the installed TensorFlow.

Metadata lives in pyproject.toml; this file only adds the compiled op.
Install with ``pip install --no-build-isolation .`` (or ``-e .``), so that
the build sees the TensorFlow it will run with: every TF-specific flag (the
C++ ABI, include and library paths, Eigen's alignment) comes from
``tf.sysconfig``. If TensorFlow or a C++ compiler is missing, or the
compile fails, the install still succeeds with a warning and
``keras_antman`` runs on stock TF ops only.

The library lands in ``keras_antman/_antman_ops.so`` (in the source tree for
editable installs) with ``_antman_ops.json`` beside it recording the
TensorFlow version it was built for; ``keras_antman.ops`` refuses to load a
library built for another version.

The lists below are the single source of the build; ``BUILD`` repeats them
for Bazel and ``tests/test_ops.py`` checks that the two agree.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import warnings
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

LIBRARY = "_antman_ops"
EXTENSION = "keras_antman." + LIBRARY

SOURCES = [
    "custom_ops/cc/ops/antman_ops.cc",
    "custom_ops/cc/kernels/antman_kernels.cc",
    "custom_ops/cc/kernels/rnn_engine_generic.cc",
    "custom_ops/cc/kernels/rnn_engine_avx2.cc",
    "custom_ops/cc/kernels/rnn_engine_avx512.cc",
]
HEADERS = [
    "custom_ops/cc/kernels/chain_checks.h",
    "custom_ops/cc/kernels/rnn_engine.h",
    "custom_ops/cc/kernels/rnn_engine_impl.h",
    "custom_ops/cc/kernels/sparse_checks.h",
    "custom_ops/cc/kernels/sparse_pack.h",
    "custom_ops/cc/kernels/sparse_term_impl.h",
    "custom_ops/cc/kernels/thread_choice.h",
]
# No -m flags: the engine files pick their instruction set with a target
# pragma and the op chooses one at run time, so the library loads on any
# x86-64 CPU. -ffp-contract=fast lets a * b + c become one FMA under
# -std=c++17 (which otherwise turns contraction off).
COPTS = [
    "-std=c++17",
    "-O3",
    "-fPIC",
    "-fopenmp",
    "-ffp-contract=fast",
]
DEFINES = ["NDEBUG"]
LINKOPTS = ["-fopenmp"]


def tf_flags():
    """TensorFlow's compile and link flags and version, from tf.sysconfig."""
    import tensorflow as tf

    return (
        list(tf.sysconfig.get_compile_flags()),
        list(tf.sysconfig.get_link_flags()),
        tf.__version__,
    )


def compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            "command failed:\n  "
            + shlex.join(cmd)
            + "\n"
            + proc.stdout
            + proc.stderr
        )


def build_library(target, build_temp, root="."):
    """Compiles SOURCES into the shared library ``target``.

    Objects are kept in ``build_temp`` and rebuilt only when a source, a
    header or the flags change.

    Returns:
        The metadata written next to the library (``_antman_ops.json``).

    Raises:
        RuntimeError: no compiler, or a compile or link step failed.
        ImportError: TensorFlow is not importable.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    tf_cflags, tf_lflags, tf_version = tf_flags()
    cflags = (
        COPTS
        + ["-D" + d for d in DEFINES]
        + ["-I" + os.path.abspath(root)]
        + tf_cflags
    )
    os.makedirs(build_temp, exist_ok=True)
    stamp = " ".join([cxx] + cflags)
    headers_mtime = max(
        os.path.getmtime(os.path.join(root, h)) for h in HEADERS
    )

    def compile_one(src):
        obj = os.path.join(
            build_temp, os.path.basename(src).replace(".cc", ".o")
        )
        flags_file = obj + ".flags"
        src_path = os.path.join(root, src)
        fresh = (
            os.path.exists(obj)
            and os.path.exists(flags_file)
            and open(flags_file).read() == stamp
            and os.path.getmtime(obj)
            > max(os.path.getmtime(src_path), headers_mtime)
        )
        if not fresh:
            _run([cxx] + cflags + ["-c", src_path, "-o", obj])
            with open(flags_file, "w") as f:
                f.write(stamp)
        return obj

    jobs = min(2, os.cpu_count() or 1)
    with ThreadPoolExecutor(jobs) as pool:
        objects = list(pool.map(compile_one, SOURCES))
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    _run([cxx, "-shared"] + objects + ["-o", target] + LINKOPTS + tf_lflags)
    info = {
        "tf_version": tf_version,
        "tf_compile_flags": tf_cflags,
        "tf_link_flags": tf_lflags,
        "compiler": subprocess.run(
            [cxx, "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0],
        "python": sysconfig.get_python_version(),
    }
    with open(os.path.splitext(target)[0] + ".json", "w") as f:
        json.dump(info, f, indent=1)
    return info


class BuildTFOps(build_ext):
    """build_ext that builds the TF op library with TF's own flags."""

    def get_ext_filename(self, fullname):
        parts = fullname.split(".")
        if parts[-1] == LIBRARY:
            return os.path.join(*parts[:-1], LIBRARY + ".so")
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if ext.name != EXTENSION:
            return super().build_extension(ext)
        target = self.get_ext_fullpath(ext.name)
        try:
            info = build_library(target, os.path.join(self.build_temp, "ops"))
            print(
                f"keras-antman: built {target} for TensorFlow "
                f"{info['tf_version']}"
            )
        except Exception as e:  # the package works without the op
            msg = (
                "keras-antman: the compiled op was not built, so the "
                "package will use stock TF ops only (kernel='compiled' "
                f"will raise). Reason: {e}"
            )
            warnings.warn(msg)
            print(msg, file=sys.stderr)
            for path in (target, os.path.splitext(target)[0] + ".json"):
                if os.path.exists(path):
                    os.remove(path)

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        # The .json beside the library travels with it.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            if ext.name != EXTENSION:
                continue
            inplace, regular = self._get_inplace_equivalent(build_py, ext)
            meta = os.path.splitext(regular)[0] + ".json"
            dest = os.path.splitext(inplace)[0] + ".json"
            if os.path.exists(regular) and os.path.exists(meta):
                self.copy_file(meta, dest, level=self.verbose)
                continue
            # The build failed: never leave a stale library behind.
            for path in (inplace, dest):
                if os.path.exists(path):
                    os.remove(path)


if __name__ == "__main__":
    setup(
        ext_modules=[
            Extension(
                EXTENSION, sources=SOURCES, depends=HEADERS, optional=True
            )
        ],
        cmdclass={"build_ext": BuildTFOps},
    )
