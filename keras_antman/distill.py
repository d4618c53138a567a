"""Three-loss knowledge distillation (AntMan paper, section 4).

The compressed model (student) is trained against the labels and against the
output of the original model (teacher), with the paper's equation 1:

    Loss = C_target * CE(labels, S) + C_mse * MSE(S_logits, T_logits)
         + C_kl * KL(T_dist || S_dist)

`Distiller` is a `keras.Model` that computes this loss in `compute_loss`, so
plain `compile`/`fit`/`evaluate` and every callback work.
`calibrate_coefficients` implements the paper's method for choosing the
coefficients. Each term is data, a `DistillationTerm` (history key, compile
keyword of its coefficient, Keras loss, tracker): the Distiller, the
calibration and the coefficient rule iterate over one list, `_paper_terms`,
so another term is one more entry (`compile(extra_terms=...)`).
"""

import dataclasses
import math

import tensorflow as tf

from keras_antman import _keras
from keras_antman import calibration
from keras_antman._keras import keras
from keras_antman._keras import ops

_PACKAGE = "keras_antman"


def _num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _scale_for_distribution(value):
    # Keras losses divide by the replica count so that the gradients that
    # MirroredStrategy sums over replicas are those of the global mean; do
    # the same for the student's regularization losses.
    replicas = _num_replicas()
    if replicas > 1:
        value = value * (1.0 / replicas)
    return value


def _unscale_for_distribution(value):
    replicas = _num_replicas()
    if replicas > 1:
        value = value * float(replicas)
    return value


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LogitsMeanSquaredError(_keras.Loss):
    """Mean squared error between student and teacher logits.

    The paper's MSE term: for each example (and each timestep of a
    per-timestep output) the squared difference of the two logit vectors,
    averaged over the last (class) axis, as `keras.losses.MeanSquaredError`
    does. Masks on `y_pred` and sample weights reduce it like any Keras
    loss.

    Args:
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        name: Loss name. Defaults to `"logits_mean_squared_error"`.
        dtype: Computation dtype. Defaults to `None` (floatx).

    Call arguments:
        y_true: Teacher logits, shape `[..., classes]`.
        y_pred: Student logits, same shape.
        sample_weight: Optional weights broadcastable to `y_pred.shape[:-1]`.

    Returns:
        The reduced loss (a scalar with the default reduction).

    Example:

    >>> loss = LogitsMeanSquaredError()
    >>> float(loss([[0.0, 2.0]], [[1.0, 0.0]]))
    2.5
    """

    def __init__(
        self,
        reduction="sum_over_batch_size",
        name="logits_mean_squared_error",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        y_true = ops.convert_to_tensor(y_true, dtype=self.dtype)
        y_pred = ops.convert_to_tensor(y_pred, dtype=self.dtype)
        return ops.mean(ops.square(y_pred - y_true), axis=-1)

    def get_config(self):
        return {
            "reduction": self.reduction,
            "name": self.name,
            "dtype": self.dtype,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LogitsKLDivergence(_keras.Loss):
    """KL divergence of the student's distribution from the teacher's.

    Computes, per example (and timestep),
    `T**2 * sum_c p_c * (log p_c - log q_c)` with
    `p = softmax(teacher_logits / T)` and `q = softmax(student_logits / T)`,
    summed over the class axis. Log-probabilities come from `log_softmax`,
    so no probability is clipped.

    The factor `T**2` is Hinton et al.'s convention: the gradient of the
    softened KL shrinks as `1 / T**2`, and the factor keeps the term's
    gradient scale (and so a calibrated `C_kl`) comparable across
    temperatures. At the paper's setting `T = 1` it is 1.

    Args:
        temperature: Softmax temperature `T > 0`. Defaults to `1.0`.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        name: Loss name. Defaults to `"logits_kl_divergence"`.
        dtype: Computation dtype. Defaults to `None` (floatx).

    Call arguments:
        y_true: Teacher logits, shape `[..., classes]`.
        y_pred: Student logits, same shape.
        sample_weight: Optional weights broadcastable to `y_pred.shape[:-1]`.

    Returns:
        The reduced loss (a scalar with the default reduction).

    Raises:
        ValueError: If `temperature` is not a positive number.

    Example:

    >>> loss = LogitsKLDivergence(temperature=2.0)
    >>> float(loss([[1.0, 1.0]], [[1.0, 1.0]]))
    0.0
    """

    def __init__(
        self,
        temperature=1.0,
        reduction="sum_over_batch_size",
        name="logits_kl_divergence",
        dtype=None,
    ):
        _check_temperature(temperature)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        t = self.temperature
        y_true = ops.convert_to_tensor(y_true, dtype=self.dtype)
        y_pred = ops.convert_to_tensor(y_pred, dtype=self.dtype)
        log_p = ops.log_softmax(y_true / t, axis=-1)
        log_q = ops.log_softmax(y_pred / t, axis=-1)
        kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
        return kl * (t * t)

    def get_config(self):
        return {
            "temperature": self.temperature,
            "reduction": self.reduction,
            "name": self.name,
            "dtype": self.dtype,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Perplexity(keras.metrics.MeanMetricWrapper):
    """Perplexity: `exp` of the mean sparse categorical cross-entropy.

    For a language model with per-timestep outputs `[batch, steps, vocab]`
    the mean runs over all (unmasked, weighted) tokens seen since the last
    reset, so the result is the corpus perplexity `exp(total CE / tokens)`.

    Args:
        from_logits: Whether `y_pred` holds logits. Defaults to `True`.
        name: Metric name. Defaults to `"perplexity"`.
        dtype: Metric dtype. Defaults to `None` (floatx).

    Example:

    >>> m = Perplexity()
    >>> m.update_state([[0, 1]], [[[0.0, 0.0], [0.0, 0.0]]])
    >>> round(float(m.result()), 4)
    2.0
    """

    def __init__(self, from_logits=True, name="perplexity", dtype=None):
        super().__init__(
            fn=keras.losses.sparse_categorical_crossentropy,
            name=name,
            dtype=dtype,
            from_logits=from_logits,
        )
        self.from_logits = from_logits
        self._direction = "down"

    def update_state(self, y_true, y_pred, sample_weight=None):
        # Converting a tensor would drop its Keras mask; convert only
        # Python and NumPy inputs.
        if not hasattr(y_true, "shape"):
            y_true = ops.convert_to_tensor(y_true)
        if not hasattr(y_pred, "shape"):
            y_pred = ops.convert_to_tensor(y_pred, dtype=self.dtype)
        return super().update_state(y_true, y_pred, sample_weight)

    def result(self):
        return ops.exp(super().result())

    def get_config(self):
        return {
            "from_logits": self.from_logits,
            "name": self.name,
            "dtype": self.dtype,
        }


def _check_temperature(temperature):
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(
            "`temperature` must be a positive finite number. "
            f"Received: temperature={temperature!r}"
        )


def _check_coefficient(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"`{name}` must be a finite number >= 0. Received: {name}={value!r}"
        )
    return float(value)


def _output_shapes(model):
    """Static output shapes of a Functional/Sequential model, else None."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    if not outputs:
        return None
    return [tuple(o.shape) for o in outputs]


def _shapes_fit(a, b):
    if len(a) != len(b):
        return False
    return all(x is None or y is None or x == y for x, y in zip(a, b))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class _FunctionLoss(_keras.Loss):
    """Wraps a `fn(y_true, y_pred)` loss so masks and weights apply."""

    def __init__(self, fn, name=None, reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(
            name=name or getattr(fn, "__name__", "target_loss"),
            reduction=reduction,
            dtype=dtype,
        )
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)

    def get_config(self):
        return {
            "fn": keras.saving.serialize_keras_object(self.fn),
            "name": self.name,
            "reduction": self.reduction,
            "dtype": self.dtype,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["fn"] = keras.saving.deserialize_keras_object(config["fn"])
        return cls(**config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
@dataclasses.dataclass(frozen=True)
class DistillationTerm:
    """One weighted term of the distillation loss.

    A `Distiller` adds `coefficient * loss(reference, student_logits,
    sample_weight)` for each of its terms, where `reference` is the labels
    `y` (`uses_labels=True`) or the teacher's logits, and reports the
    unweighted value under `name`. `Distiller.compile` builds the paper's
    three terms (`target_loss`, `mse_loss`, `kl_loss`) and appends those
    given as `extra_terms`; `calibrate_coefficients` trains with each term
    alone. `compile` copies every term with its coefficient (the keyword
    `argument` if given, else `coefficient`) and a new `keras.metrics.Mean`
    as `tracker`.

    Args:
        name: History key of the term's mean value, e.g. `"mse_loss"`
            (`"val_mse_loss"` in validation).
        argument: `compile` keyword of its coefficient, e.g. `"c_mse"`.
        loss: A `keras.losses.Loss` whose `y_pred` is the student's logits;
            masks and `sample_weight` reduce it as in any Keras loss.
        uses_labels: Whether `loss` compares with the labels instead of the
            teacher's logits. Defaults to `False`.
        coefficient: Weight used when `compile` is not given `argument`.
            Defaults to 1.0.
        tracker: The term's metric; set by `compile`. Defaults to `None`.

    Example:

    ```python
    l1 = am.DistillationTerm("l1_loss", "c_l1",
                             keras.losses.MeanAbsoluteError())
    d.compile(c_mse=30.0, c_kl=1000.0, extra_terms=[l1], c_l1=5.0)
    d.fit(...)  # history: loss, target_loss, mse_loss, kl_loss, l1_loss
    ```
    """

    name: str
    argument: str
    loss: keras.losses.Loss
    uses_labels: bool = False
    coefficient: float = 1.0
    tracker: keras.metrics.Mean | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    def get_config(self):
        return {
            "name": self.name,
            "argument": self.argument,
            "loss": keras.saving.serialize_keras_object(self.loss),
            "uses_labels": self.uses_labels,
            "coefficient": self.coefficient,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)


def _label_loss(loss):
    if loss is None:
        return keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, name="target_loss"
        )
    if isinstance(loss, str):
        fn = keras.losses.get(loss)
        if fn is None:
            raise ValueError(
                f"Distiller.compile: unknown `loss`. Received: loss={loss!r}"
            )
        loss = fn
    if isinstance(loss, keras.losses.Loss):
        return loss
    if not callable(loss):
        raise ValueError(
            "Distiller.compile: `loss` must be a keras.losses.Loss, a loss "
            f"name or a callable. Received: loss={loss!r}"
        )
    # A bare function does not see masks or sample weights; wrap it so that
    # it reduces like the other terms.
    return _FunctionLoss(loss)


def _paper_terms(loss=None, temperature=1.0, c_target=1.0, c_mse=1.0,
                 c_kl=1.0):
    """The paper's equation 1, one term per entry; the first is the labels'.

    `coefficients_from_losses` balances every term against the first.
    """
    return (
        DistillationTerm("target_loss", "c_target", _label_loss(loss),
                         uses_labels=True, coefficient=c_target),
        DistillationTerm("mse_loss", "c_mse",
                         LogitsMeanSquaredError(name="mse_loss"),
                         coefficient=c_mse),
        DistillationTerm("kl_loss", "c_kl",
                         LogitsKLDivergence(temperature, name="kl_loss"),
                         coefficient=c_kl),
    )


def _check_extra_terms(extra_terms, where):
    extra_terms = tuple(extra_terms or ())
    for term in extra_terms:
        if not isinstance(term, DistillationTerm):
            raise ValueError(
                f"{where}: `extra_terms` must hold DistillationTerm objects. "
                f"Received: {term!r} of type {type(term).__name__}"
            )
    taken = [(t.name, t.argument) for t in _paper_terms()]
    for term in extra_terms:
        for used_name, used_argument in taken:
            if term.name == used_name or term.argument == used_argument:
                raise ValueError(
                    f"{where}: each term needs its own `name` and `argument`;"
                    f" {term.name!r} ({term.argument!r}) repeats "
                    f"{used_name!r} ({used_argument!r})."
                )
        taken.append((term.name, term.argument))
    return extra_terms


def _check_student_trains(student):
    if student.built and not student.trainable_weights:
        raise ValueError(
            f"Distiller: the student {student.name!r} has 0 trainable "
            f"weights (of {len(student.weights)}), so training would change "
            "nothing. A student copied from a frozen teacher (as `compress` "
            "or `keras.models.clone_model` do) keeps `trainable=False`; set "
            "`student.trainable = True` before creating the Distiller."
        )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Distiller(_keras.MultiWorkerFit, keras.Model):
    """Trains a student model from labels and a frozen teacher (paper eq. 1).

    The loss is

        C_target * label_loss(y, S) + C_mse * MSE(S, T) + C_kl * KL(T || S)

    where `S` and `T` are the student's and teacher's logits on the same
    input. `MSE` averages the squared logit difference over the class axis
    (`LogitsMeanSquaredError`); `KL` compares `softmax(T / temperature)` with
    `softmax(S / temperature)`, summed over classes and multiplied by
    `temperature**2` (`LogitsKLDivergence`). Each term is averaged over
    examples, and over timesteps for per-timestep outputs
    `[batch, steps, classes]`, exactly as Keras reduces a loss
    (`"sum_over_batch_size"`): a Keras mask on the student's output (from
    `Embedding(mask_zero=True)` or `Masking`) and `sample_weight` (per
    example `[batch]` or per timestep `[batch, steps]`) weight all terms
    the same way. A term is `sum(w * term) / n`, with `n` the number of
    unmasked positions; masked positions contribute nothing. More terms
    (`DistillationTerm`) can be added with `compile(extra_terms=...)`.

    The teacher is frozen (`teacher.trainable` is set to `False`) and called
    with `training=False`; only the student's weights train. Calling the
    distiller calls the student, so `predict` returns student logits. Keep
    `distiller.student` after training.

    Each term is tracked by its own mean metric, named `target_loss`,
    `mse_loss` and `kl_loss` (`val_...` in validation), next to `loss`
    (the weighted total, plus the student's regularization losses) and the
    student metrics given to `compile`. Terms are reported before
    weighting, also when their coefficient is 0. Callbacks that monitor a
    term (`"val_kl_loss"`) need `mode="min"`: Keras infers the direction
    only for `loss` and compiled metrics. With unlabeled data (`fit(x)`)
    and `c_target=0`, `target_loss` is not updated and reads 0. After
    `compile`, each coefficient reads as an attribute (`distiller.c_mse`).

    `save_weights`/`load_weights` (so `ModelCheckpoint(save_weights_only=True)`
    and `BackupAndRestore`) save and restore the student's, the teacher's
    and the optimizer's variables; `.keras` files hold both models and the
    compile settings. Under `tf.distribute` strategies, create the student,
    the teacher and the distiller inside `strategy.scope()`.

    Args:
        student: The `keras.Model` to train. It must output logits and have
            trainable weights.
        teacher: The trained `keras.Model` whose logits the student imitates;
            its output shape must match the student's.
        name: Model name. Defaults to `"distiller"`.
        **kwargs: Passed to `keras.Model`.

    Raises:
        TypeError: If `student` or `teacher` is not a `keras.Model`.
        ValueError: If they are the same object, have several outputs,
            their output shapes differ, or the student has no trainable
            weights.

    Example:

    ```python
    import keras_antman as am

    d = am.Distiller(student=student, teacher=teacher)
    d.compile(optimizer="adam", c_target=1.0, c_mse=30.0, c_kl=1000.0,
              metrics=[am.Perplexity()])
    d.fit(train_ds, validation_data=val_ds, epochs=5)
    student = d.student
    ```
    """

    def __init__(self, student, teacher, name="distiller", **kwargs):
        super().__init__(name=name, **kwargs)
        for arg, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, keras.Model):
                raise TypeError(
                    f"Distiller: `{arg}` must be a keras.Model. "
                    f"Received: {arg}={model!r} of type {type(model).__name__}"
                )
        if student is teacher:
            raise ValueError(
                "Distiller: `student` and `teacher` must be different models; "
                f"received the same object ({student.name!r}) for both. Clone "
                "the teacher (keras.models.clone_model) to make a student."
            )
        _check_student_trains(student)
        student_shapes = _output_shapes(student)
        teacher_shapes = _output_shapes(teacher)
        for arg, shapes in (("student", student_shapes),
                            ("teacher", teacher_shapes)):
            if shapes is not None and len(shapes) != 1:
                raise ValueError(
                    f"Distiller: `{arg}` must have a single output (logits); "
                    f"received a model with {len(shapes)} outputs: {shapes}."
                )
        if student_shapes and teacher_shapes:
            self._check_output_shapes(teacher_shapes[0], student_shapes[0])

        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        # Set by compile. A tuple of dataclasses keeps the trackers out of
        # Keras's attribute tracking, so a new compile replaces them
        # instead of adding more metrics of the same names; `metrics` lists
        # them.
        self._terms = ()
        self._extra_terms = ()
        self._label_loss = None
        self.temperature = 1.0
        # BackupAndRestore needs a built model before fit(); the distiller
        # has no weights of its own, so it is built when both models are.
        if student.built and teacher.built:
            self.built = True

    def __getattr__(self, name):
        # `c_target`, `c_mse`, ...: the compiled coefficients.
        for term in self.__dict__.get("_terms", ()):
            if term.argument == name:
                return term.coefficient
        raise AttributeError(
            f"'{type(self).__name__}' object has no attribute '{name}'"
        )

    @staticmethod
    def _check_output_shapes(teacher_shape, student_shape):
        if not _shapes_fit(tuple(teacher_shape), tuple(student_shape)):
            raise ValueError(
                "Distiller: the teacher's and the student's outputs must have "
                "the same shape (same classes, and same timesteps for "
                f"per-timestep outputs). Received: teacher output shape "
                f"{tuple(teacher_shape)}, student output shape "
                f"{tuple(student_shape)}."
            )

    def compile(
        self,
        optimizer="adam",
        c_target=1.0,
        c_mse=1.0,
        c_kl=1.0,
        temperature=1.0,
        loss=None,
        metrics=None,
        extra_terms=None,
        **kwargs,
    ):
        """Configures the distiller for training.

        The defaults weigh the three terms equally, which is rarely right:
        use `calibrate_coefficients` (the paper's method) or the values it
        found (the paper used 1, 30 and 1000 for its PTB student).

        Args:
            optimizer: Optimizer (name or instance) for the student's
                weights. Defaults to `"adam"`.
            c_target: Coefficient of the label loss, `>= 0`. Defaults to 1.
            c_mse: Coefficient of the logit MSE term, `>= 0`. Defaults to 1.
            c_kl: Coefficient of the KL term, `>= 0`. Defaults to 1.
            temperature: Softmax temperature of the KL term (see
                `LogitsKLDivergence`; the MSE term uses raw logits).
                Defaults to 1.0, the paper's setting.
            loss: Label loss: a `keras.losses.Loss` instance or a name for
                `keras.losses.get`. Defaults to
                `SparseCategoricalCrossentropy(from_logits=True)`.
            metrics: Student metrics, as for `keras.Model.compile`, e.g.
                `[Perplexity()]` for a language model.
            extra_terms: `DistillationTerm`s added after the paper's three.
                Defaults to `None` (none).
            **kwargs: The coefficient of an extra term, by its `argument`
                (e.g. `c_l1=5.0`); the rest go to `keras.Model.compile`
                (e.g. `jit_compile`, `steps_per_execution`,
                `weighted_metrics`).

        Raises:
            ValueError: If a coefficient is negative or not finite, all
                coefficients are 0, `temperature` is not positive, `loss`
                is unknown, or an extra term repeats a name or argument.
        """
        if "loss_weights" in kwargs:
            raise ValueError(
                "Distiller.compile: `loss_weights` is not supported; weigh "
                "the terms with `c_target`, `c_mse` and `c_kl`. Received: "
                f"loss_weights={kwargs['loss_weights']!r}"
            )
        _check_temperature(temperature)
        label_loss = _label_loss(loss)
        extra_terms = _check_extra_terms(extra_terms, "Distiller.compile")
        terms = _paper_terms(label_loss, temperature, c_target, c_mse, c_kl)
        terms = tuple(
            dataclasses.replace(
                term,
                coefficient=_check_coefficient(
                    term.argument, kwargs.pop(term.argument, term.coefficient)
                ),
                tracker=keras.metrics.Mean(name=term.name),
            )
            for term in terms + extra_terms
        )
        if not any(term.coefficient for term in terms):
            arguments = ", ".join(f"`{term.argument}`" for term in terms)
            raise ValueError(
                f"Distiller.compile: at least one of {arguments} must be > 0."
                " Received: all are 0."
            )
        self.temperature = float(temperature)
        self._label_loss = label_loss
        self._extra_terms = extra_terms
        self._terms = terms
        super().compile(optimizer=optimizer, loss=None, metrics=metrics,
                        **kwargs)

    @property
    def metrics(self):
        return super().metrics + [term.tracker for term in self._terms]

    def build(self, input_shape=None):
        # No weights of its own. Keras builds a distiller whose models are
        # unbuilt (subclassed ones) by calling it on a symbolic batch; `call`
        # then builds the teacher too, so fit() finds all variables.
        self.built = True

    def call(self, inputs, training=None):
        if not self.teacher.built:
            self.teacher(inputs, training=False)
        return self.student(inputs, training=training)

    def _expand_sample_weight(self, sample_weight, y_pred):
        # Keras multiplies a `[batch]` weight into `[batch, steps]` losses
        # along the last axis; make it `[batch, 1]` so that it broadcasts
        # over timesteps instead.
        if sample_weight is None:
            return None
        sample_weight = ops.convert_to_tensor(sample_weight)
        if len(sample_weight.shape) == 1 and len(y_pred.shape) >= 3:
            sample_weight = ops.expand_dims(sample_weight, -1)
        return sample_weight

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """Computes the weighted sum of the terms and updates their trackers.

        Args:
            x: Input batch; the teacher is called on it with
                `training=False`.
            y: Labels for the label loss, or `None` for unlabeled data
                (allowed only when `c_target == 0`).
            y_pred: Student logits (computed from `x` when `None`).
            sample_weight: Optional `[batch]` or `[batch, steps]` weights.
            training: Whether the student runs in training mode.

        Returns:
            The scalar total loss (scaled for the replica count under a
            distribution strategy, as Keras losses are).

        Raises:
            ValueError: If the teacher's and student's logits differ in
                shape, the student returns several outputs or has no
                trainable weights, or `y` is missing while `c_target > 0`.
            RuntimeError: If the distiller was not compiled.
        """
        if not self._terms:
            raise RuntimeError(
                "Distiller: call `compile()` before `fit()` or `evaluate()`."
            )
        if y_pred is None:
            y_pred = self(x, training=training)
        if training:
            _check_student_trains(self.student)
        if isinstance(y_pred, (list, tuple, dict)):
            raise ValueError(
                "Distiller: the student must return one logits tensor; "
                f"received {type(y_pred).__name__} of {len(y_pred)} outputs."
            )
        teacher_logits = self.teacher(x, training=False)
        if isinstance(teacher_logits, (list, tuple, dict)):
            raise ValueError(
                "Distiller: the teacher must return one logits tensor; "
                f"received {type(teacher_logits).__name__} of "
                f"{len(teacher_logits)} outputs."
            )
        self._check_output_shapes(teacher_logits.shape, y_pred.shape)
        teacher_logits = ops.stop_gradient(teacher_logits)
        sample_weight = self._expand_sample_weight(sample_weight, y_pred)
        batch_size = ops.shape(y_pred)[0]

        # Keras losses compute in floatx, also for a float16 student.
        total = ops.zeros((), dtype=keras.config.floatx())
        for term in self._terms:
            if not term.uses_labels:
                reference = teacher_logits
            elif y is not None:
                reference = y
            elif term.coefficient > 0:
                raise ValueError(
                    f"Distiller: labels `y` are required when "
                    f"{term.argument} > 0. Received: y=None with "
                    f"{term.argument}={term.coefficient}. Pass labels, or "
                    f"compile with {term.argument}=0 to distil from "
                    "unlabeled data."
                )
            else:
                continue
            value = _keras.call_loss(term.loss, reference, y_pred,
                                     sample_weight)
            term.tracker.update_state(
                _unscale_for_distribution(value), sample_weight=batch_size
            )
            # A zero coefficient removes the term outright (0 * inf = nan).
            if term.coefficient != 0.0:
                total = total + ops.cast(term.coefficient * value, total.dtype)
        for extra in self.student.losses:
            total = total + _scale_for_distribution(
                ops.cast(ops.sum(extra), total.dtype)
            )
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        sample_weight = self._expand_sample_weight(sample_weight, y_pred)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def load_weights(self, filepath, *args, **kwargs):
        """Loads student, teacher and optimizer weights (see `save_weights`).

        A compiled distiller's optimizer is built first, as
        `BackupAndRestore` does, so that a checkpoint written during
        training restores the optimizer's state too.
        """
        optimizer = getattr(self, "optimizer", None)
        if (self.built and optimizer is not None
                and not _keras.optimizer_built(optimizer)):
            optimizer.build(self.trainable_variables)
        return super().load_weights(filepath, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "student": keras.saving.serialize_keras_object(self.student),
                "teacher": keras.saving.serialize_keras_object(self.teacher),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(
            config["student"]
        )
        config["teacher"] = keras.saving.deserialize_keras_object(
            config["teacher"]
        )
        return cls(**config)

    def get_compile_config(self):
        config = super().get_compile_config()
        if not config:
            return config
        config = dict(config)
        config.pop("loss", None)
        config.pop("loss_weights", None)
        config.update({term.argument: term.coefficient for term in self._terms})
        config.update(
            {
                "temperature": self.temperature,
                "loss": keras.saving.serialize_keras_object(self._label_loss),
            }
        )
        if self._extra_terms:
            config["extra_terms"] = keras.saving.serialize_keras_object(
                list(self._extra_terms)
            )
        return config

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built and self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)


@dataclasses.dataclass(frozen=True)
class DistillationCoefficients:
    """Loss coefficients for `Distiller.compile`, with the losses behind them.

    Each coefficient and each loss also reads as an attribute: `c.c_mse`,
    `c.mse_loss`.

    Attributes:
        coefficients: The coefficient of each term by its `compile`
            keyword, e.g. `{"c_target": 1.0, "c_mse": 30.0, "c_kl": 1000.0}`.
        losses: Each term's converged loss when trained with it alone, by
            the term's name (`"target_loss"`, ...); empty if not measured.

    Example:

    >>> c = coefficients_from_losses(4.110, 0.133, 0.004)
    >>> c.compile_kwargs()
    {'c_target': 1.0, 'c_mse': 30.0, 'c_kl': 1000.0}
    >>> c.kl_loss
    0.004
    """

    coefficients: dict
    losses: dict = dataclasses.field(default_factory=dict)

    def __getattr__(self, name):
        for values in (self.__dict__.get("coefficients", {}),
                       self.__dict__.get("losses", {})):
            if name in values:
                return values[name]
        raise AttributeError(
            f"'{type(self).__name__}' object has no attribute '{name}'"
        )

    def compile_kwargs(self):
        """Returns `{"c_target": ..., "c_mse": ..., "c_kl": ...}`.

        Returns:
            A dict to pass to `Distiller.compile(**...)`.
        """
        return dict(self.coefficients)


def _round_significant(value, digits):
    # "%.1g" rounds to one significant digit: 30.9 -> 30, 1027.5 -> 1000.
    return float(f"{value:.{digits}g}")


def _balanced_coefficients(terms, losses, significant_digits):
    """The paper's rule over `terms`: `C_i = L_first / L_i`, rounded."""
    values = {}
    for term, raw in zip(terms, losses, strict=True):
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"coefficients_from_losses: `{term.name}` must be a finite "
                f"number > 0 to set a coefficient from it. Received: "
                f"{term.name}={raw!r}. (A zero loss means the student "
                "already matches the target; choose that coefficient "
                "yourself.)"
            )
        values[term.name] = value
    if significant_digits is not None and (
        isinstance(significant_digits, bool)
        or not isinstance(significant_digits, int)
        or significant_digits < 1
    ):
        raise ValueError(
            "coefficients_from_losses: `significant_digits` must be a "
            "positive int or None. Received: "
            f"significant_digits={significant_digits!r}"
        )
    reference = values[terms[0].name]
    coefficients = {}
    for term in terms:
        ratio = reference / values[term.name]
        if significant_digits is not None:
            ratio = _round_significant(ratio, significant_digits)
        coefficients[term.argument] = ratio
    return DistillationCoefficients(coefficients=coefficients, losses=values)


def coefficients_from_losses(
    target_loss, mse_loss, kl_loss, significant_digits=1
):
    """Coefficients that make the three weighted loss terms about equal.

    The paper's rule (section 4): with `C_target = 1`, choose
    `C_mse = L_target / L_mse` and `C_kl = L_target / L_kl`, so that each
    weighted term is about `L_target` at convergence. The ratios are rounded
    to `significant_digits` significant digits (a "nice" value, as the
    paper's 30 and 1000); with the paper's losses 4.110, 0.133 and 0.004 the
    ratios 30.9 and 1027.5 round to 30 and 1000.

    Args:
        target_loss: Converged label loss when trained on the labels alone.
        mse_loss: Converged MSE when trained on the MSE term alone.
        kl_loss: Converged KL when trained on the KL term alone.
        significant_digits: Significant digits kept, a positive int, or
            `None` to keep the exact ratios. Defaults to 1.

    Returns:
        A `DistillationCoefficients` holding the coefficients and the losses.

    Raises:
        ValueError: If a loss is not a finite number > 0, or
            `significant_digits` is not a positive int or `None`.

    Example:

    >>> c = coefficients_from_losses(4.110, 0.133, 0.004)
    >>> (c.c_target, c.c_mse, c.c_kl)
    (1.0, 30.0, 1000.0)
    """
    return _balanced_coefficients(
        _paper_terms(), (target_loss, mse_loss, kl_loss), significant_digits
    )


def _fresh_optimizer(optimizer):
    if isinstance(optimizer, str):
        return keras.optimizers.get(optimizer)
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer.__class__.from_config(optimizer.get_config())
    if callable(optimizer):
        return optimizer()
    raise ValueError(
        "calibrate_coefficients: `optimizer` must be a name, a "
        "keras.optimizers.Optimizer (copied for each run) or a function "
        f"returning one. Received: optimizer={optimizer!r}"
    )


def _copy_model(student, reinitialize):
    try:
        copy = keras.models.clone_model(student)
        if not reinitialize:
            # tf_keras clones a subclassed model unbuilt: this fails then.
            copy.set_weights(student.get_weights())
    except Exception as e:
        raise ValueError(
            "calibrate_coefficients: could not copy `student` with "
            "keras.models.clone_model, which needs a Functional or "
            "Sequential model or a subclassed one with get_config/from_config."
            f" Received: {student.name!r} ({type(student).__name__}); "
            f"error: {e}"
        ) from e
    return copy


def _fit_args(data):
    if isinstance(data, (tuple, list)):
        if len(data) not in (2, 3):
            raise ValueError(
                "calibrate_coefficients: array data must be (x, y) or "
                f"(x, y, sample_weight). Received a {type(data).__name__} of "
                f"length {len(data)}."
            )
        return {"x": data[0], "y": data[1],
                "sample_weight": data[2] if len(data) == 3 else None}
    return {"x": data}


def calibrate_coefficients(
    student,
    teacher,
    train_data,
    validation_data=None,
    epochs=1,
    steps=None,
    validation_steps=None,
    optimizer="adam",
    temperature=1.0,
    loss=None,
    batch_size=None,
    significant_digits=1,
    reinitialize=False,
    verbose=0,
    extra_terms=None,
):
    """Chooses the distillation coefficients by the paper's method.

    Trains one copy of `student` per term (label loss, logit MSE, KL, then
    any `extra_terms`), each from the student's current weights (or freshly
    initialised, `reinitialize=True`) and with that term alone, for
    `epochs` epochs, and records that term's converged value: on
    `validation_data` after training when it is given (as the paper does),
    else the mean over the last training epoch. Then each coefficient is
    rounded so that its weighted term is about equal to the label loss
    (`C_target = 1`; see `coefficients_from_losses`). The cost is one short
    training run per term, each also running the teacher's forward pass.

    `student` is left untouched (copies come from `keras.models.clone_model`
    and `set_weights`); `teacher.trainable` is restored afterwards.
    A stateful teacher's states are zeroed before each run, as the copies'
    are (each run starts at the beginning of `train_data`).

    Args:
        student: The compressed `keras.Model` (logits output).
        teacher: The trained `keras.Model` (same output shape).
        train_data: Anything `fit` accepts as `x` with labels inside (a
            `tf.data.Dataset` of `(x, y)` or `(x, y, sample_weight)`), or a
            tuple `(x, y)` / `(x, y, sample_weight)` of arrays.
        validation_data: Same forms, or `None` to use the training loss.
        epochs: Epochs per run; enough for each loss to level off.
            Defaults to 1.
        steps: `steps_per_epoch` for each run (needed for an infinite
            dataset). Defaults to `None` (the whole data).
        validation_steps: Steps of `validation_data` to evaluate. Defaults
            to `None` (all of it).
        optimizer: Optimizer name, instance (copied per run), or a function
            returning a new one. Defaults to `"adam"`.
        temperature: KL temperature, the one you will train with. Defaults
            to 1.0.
        loss: Label loss as in `Distiller.compile`. Defaults to sparse
            categorical cross-entropy from logits.
        batch_size: Batch size for array data. Defaults to `None`.
        significant_digits: Rounding of the coefficients, see
            `coefficients_from_losses`. Defaults to 1.
        reinitialize: Start each copy from its initializers instead of the
            student's weights. A student initialised from the teacher
            (`compress`) may already match it so closely that MSE and KL
            stay near 0 and the coefficients come out huge; the paper's
            students were trained from scratch. Defaults to `False`.
        verbose: Verbosity of `fit`/`evaluate`. Defaults to 0.
        extra_terms: `DistillationTerm`s to calibrate too, as in
            `Distiller.compile`. Defaults to `None` (none).

    Returns:
        A `DistillationCoefficients` with the coefficient and the measured
        loss of each term.

    Raises:
        ValueError: If `student` cannot be cloned or has no trainable
            weights, an argument is invalid, or a measured loss is not a
            finite positive number.

    Example:

    ```python
    coeffs = am.calibrate_coefficients(student, teacher, train_ds,
                                       validation_data=val_ds, epochs=2)
    d = am.Distiller(student=student, teacher=teacher)
    d.compile(optimizer="adam", **coeffs.compile_kwargs())
    ```
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(
            "calibrate_coefficients: `epochs` must be a positive int. "
            f"Received: epochs={epochs!r}"
        )
    extra_terms = _check_extra_terms(extra_terms, "calibrate_coefficients")
    terms = _paper_terms(loss, temperature) + extra_terms
    teacher_trainable = teacher.trainable
    measured = []
    try:
        for alone in terms:
            copy = _copy_model(student, reinitialize)
            # The copy's stateful layers start from zero states; so do the
            # teacher's, each run seeing the data from its start.
            for layer in calibration.stateful_layers(teacher):
                layer.reset_states()
            distiller = Distiller(student=copy, teacher=teacher)
            distiller.compile(
                optimizer=_fresh_optimizer(optimizer),
                temperature=temperature,
                loss=loss,
                extra_terms=extra_terms,
                **{t.argument: float(t is alone) for t in terms},
            )
            history = distiller.fit(
                **_fit_args(train_data),
                batch_size=batch_size,
                epochs=epochs,
                steps_per_epoch=steps,
                verbose=verbose,
            )
            if validation_data is None:
                measured.append(history.history[alone.name][-1])
            else:
                results = distiller.evaluate(
                    **_fit_args(validation_data),
                    batch_size=batch_size,
                    steps=validation_steps,
                    verbose=verbose,
                    return_dict=True,
                )
                measured.append(results[alone.name])
    finally:
        teacher.trainable = teacher_trainable
    return _balanced_coefficients(terms, measured, significant_digits)
