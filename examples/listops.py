"""ListOps (Long Range Arena): a bidirectional Performer classifier.

ListOps expressions nest the operators MAX, MIN, MED (median, rounded down)
and SM (sum modulo 10) over the digits 0 to 9, for example
`[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]`, whose value is 5. The model
reads the tokens (operators, digits and closing brackets) and predicts the
value, one of 10 classes. The data is generated here with a fixed seed, by
the rules of the Long Range Arena task (Tay et al., 2021): with
`--min-length 500 --max-length 2000 --max-depth 10 --max-args 10` it is the
full-size task, sequences of up to 2000 tokens.

The script trains a bidirectional Performer classifier and, for the same
steps on the same batches, the identical model with exact softmax attention
and, with `--local-windows`, the Performer with exact attention over a band
of each width. It reports each model's test accuracy next to chance (always
predicting the most frequent training label), and its time per training step:
the median wall time of a batch after the first 10. The defaults are small
and run in a few minutes on 2 CPU cores.
"""

import argparse
import csv
import random
import time

import numpy as np

# example_utils first: it imports TensorFlow without its start-up messages.
from examples.example_utils import ATTENTION_NAMES
from examples.example_utils import StepTimer
from examples.example_utils import add_model_arguments
from examples.example_utils import build_model
from examples.example_utils import print_table
from examples.example_utils import timed_fit

# isort: split

import keras
import tensorflow as tf

OPERATORS = {
    "[MAX": max,
    "[MIN": min,
    "[MED": lambda values: int(np.median(values)),
    "[SM": lambda values: sum(values) % 10,
}
OPERATOR_NAMES = list(OPERATORS)
CLOSE = "]"
# Token id 0 is padding.
VOCABULARY = ["<pad>"] + [str(d) for d in range(10)] + list(OPERATORS) + [CLOSE]
TOKEN_IDS = {token: index for index, token in enumerate(VOCABULARY)}
NUM_CLASSES = 10
# Training steps left out of the time per step: tracing and warm-up.
WARMUP_STEPS = 10


class TooLong(Exception):
    """An expression outgrew its length budget."""


def random_expression(rng, max_depth, max_args, max_length, leaf_probability):
    """A random ListOps expression as `(tokens, value)`, drawn with `rng`,
    a `random.Random`.

    The root is an operator. Below it and above `max_depth`, a node is a
    digit with probability `leaf_probability`, and otherwise an operator
    applied to 2 to `max_args` sub-expressions; at `max_depth` it is a
    digit. Raises `TooLong` as soon as the expression
    has more than `max_length` tokens.
    """
    tokens = []

    def emit(token):
        if len(tokens) == max_length:
            raise TooLong()
        tokens.append(token)

    def node(depth):
        # The root is always an operator: a lone digit is never long enough.
        is_leaf = depth > 1 and rng.random() < leaf_probability
        if depth >= max_depth or is_leaf:
            digit = rng.randrange(10)
            emit(str(digit))
            return digit
        operator = rng.choice(OPERATOR_NAMES)
        emit(operator)
        values = [node(depth + 1) for _ in range(rng.randint(2, max_args))]
        emit(CLOSE)
        return OPERATORS[operator](values)

    value = node(1)
    return tokens, value


def generate_listops(count, args, rng):
    """`count` expressions of `args.min_length` to `args.max_length` tokens.

    Returns:
        `(token_ids, labels)`: `(count, max_length)` int32 ids padded with 0,
        and `(count,)` int32 values.
    """
    token_ids = np.zeros((count, args.max_length), np.int32)
    labels = np.zeros((count,), np.int32)
    made = 0
    while made < count:
        try:
            tokens, value = random_expression(
                rng,
                args.max_depth,
                args.max_args,
                args.max_length,
                args.leaf_probability,
            )
        except TooLong:
            continue
        if len(tokens) < args.min_length:
            continue
        token_ids[made, : len(tokens)] = [TOKEN_IDS[t] for t in tokens]
        labels[made] = value
        made += 1
    return token_ids, labels


def chance_accuracy(train_labels, test_labels):
    """Test accuracy of always predicting the most frequent training label."""
    majority = np.bincount(train_labels, minlength=NUM_CLASSES).argmax()
    return float(np.mean(test_labels == majority))


def model_name(attention, local_window):
    name = ATTENTION_NAMES[attention]
    return f"{name}, exact window {local_window}" if local_window else name


def train(attention, args, train_data, test_data, local_window=0):
    name = model_name(attention, local_window)
    print(f"\n{name} attention:")
    model = build_model(
        args,
        attention,
        vocabulary_size=len(VOCABULARY),
        max_length=args.max_length,
        task="classification",
        num_classes=NUM_CLASSES,
        local_window=local_window,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    timer = StepTimer()
    seconds = timed_fit(model, train_data, test_data, args, [timer])
    results = model.evaluate(test_data, verbose=0, return_dict=True)
    warmup = min(WARMUP_STEPS, len(timer.seconds) // 2)
    return {
        "model": name,
        "parameters": f"{model.count_params():,}",
        "train s": f"{seconds:.0f}",
        "ms/step": f"{1000 * timer.median(warmup):.1f}",
        "test accuracy": f"{results['accuracy']:.3f}",
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(
        parser,
        steps=500,
        epochs=5,
        batch_size=32,
        num_features=32,
        learning_rate=5e-4,
    )
    parser.add_argument(
        "--train-size", type=int, default=6000, help="training expressions"
    )
    parser.add_argument(
        "--test-size", type=int, default=1000, help="test expressions"
    )
    parser.add_argument(
        "--min-length",
        type=int,
        default=32,
        help="shortest expression, in tokens",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="longest expression, in tokens (LRA: 2000)",
    )
    parser.add_argument(
        "--max-depth", type=int, default=10, help="deepest nesting (LRA: 10)"
    )
    parser.add_argument(
        "--max-args",
        type=int,
        default=10,
        help="most arguments of an operator (LRA: 10)",
    )
    parser.add_argument(
        "--leaf-probability",
        type=float,
        default=0.75,
        help="chance that a node below max depth is a digit",
    )
    parser.add_argument(
        "--local-windows",
        type=int,
        nargs="*",
        default=[],
        help="also train the Performer with an exact local "
        "window of each of these sizes (FavorAttention's "
        "local_window)",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the exact-attention model",
    )
    parser.add_argument(
        "--csv",
        default=None,
        help="also write the summary table to this CSV file, "
        "with the seed in each row",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.min_length <= args.max_length:
        parser.error("--min-length must be between 1 and --max-length")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    rng = random.Random(args.seed)
    train_x, train_y = generate_listops(args.train_size, args, rng)
    test_x, test_y = generate_listops(args.test_size, args, rng)
    lengths = np.sum(train_x != 0, axis=1)
    print(
        f"ListOps: {args.train_size} training and {args.test_size} test "
        f"expressions of {lengths.min()} to {lengths.max()} tokens "
        f"(mean {lengths.mean():.0f}), generated in "
        f"{time.perf_counter() - start:.1f} s."
    )
    train_data = (
        tf.data.Dataset.from_tensor_slices((train_x, train_y))
        .shuffle(len(train_x), seed=args.seed)
        .batch(args.batch_size, drop_remainder=True)
        .repeat()
    )
    test_data = tf.data.Dataset.from_tensor_slices((test_x, test_y)).batch(
        args.batch_size
    )
    attentions = ["favor"] if args.no_baseline else ["favor", "exact"]
    rows = [train(a, args, train_data, test_data) for a in attentions]
    rows += [
        train("favor", args, train_data, test_data, window)
        for window in args.local_windows
    ]
    chance = chance_accuracy(train_y, test_y)
    rows.append(
        {
            "model": "Chance (majority class)",
            "parameters": "-",
            "train s": "-",
            "ms/step": "-",
            "test accuracy": f"{chance:.3f}",
        }
    )
    print("\nSummary")
    print_table(list(rows[0]), [list(row.values()) for row in rows])
    print(f"Total time: {time.perf_counter() - start:.0f} s")
    if args.csv:
        with open(args.csv, "w", newline="") as file:
            writer = csv.DictWriter(file, ["seed"] + list(rows[0]))
            writer.writeheader()
            writer.writerows({"seed": args.seed, **row} for row in rows)
    return {"rows": rows, "chance": chance}


if __name__ == "__main__":
    main()
