"""Quality of FAVOR++ against FAVOR+ in the long-context language model.

`benchmarks/quality.py`'s run (the same corpus, model, batches, validation
windows and flags) with one more configuration, `favor_plus_plus`
(`feature_map="favor++"`; the model is causal, so its coefficient comes from
the moving statistic of past training batches), trained beside `favor`
(FAVOR+, `feature_map="softmax"`) at equal steps. Writes
`feature_quality.csv` and `feature_quality.json` to `--output-dir`
(`quality.py`'s own files are left alone).

    python -m benchmarks.feature_quality --seeds 0
    python -m benchmarks.feature_quality --configs favor favor_plus_plus --seeds 0 1
"""

import os

from benchmarks import quality

quality.CONFIGS["favor_plus_plus"] = quality.Config(
    "FAVOR++, the initial projection throughout", {"feature_map": "favor++"}
)


def main(argv=None):
    args = quality.parse_args(argv)
    if argv is None and args.configs == list(quality.CONFIGS):
        args.configs = ["favor", "favor_plus_plus"]
    train_tokens, validation_tokens = quality.load_corpus(args)
    validation = quality.validation_data(validation_tokens, args)
    rows = []
    for seed in args.seeds:
        train = quality.training_data(train_tokens, seed, args)
        rows += [
            quality.train_and_evaluate(name, seed, train, validation, args)
            for name in args.configs
        ]
    stem = os.path.join(args.output_dir, "feature_quality")
    settings = {k: v for k, v in vars(args).items() if k != "output_dir"}
    quality.common.write_environment(
        stem + ".json", quality.common.describe(), settings
    )
    quality.common.write_csv(stem + ".csv", quality.FIELDS, rows)
    quality.example_utils.print_table(
        [
            "config",
            "mean",
            "per seed",
            f"vs {args.baseline}",
            "ms/step",
            "redraw steps",
        ],
        quality.summary(rows, args.baseline),
    )
    return rows


if __name__ == "__main__":
    main()
