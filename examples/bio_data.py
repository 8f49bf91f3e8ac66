"""Real biological sequences for the examples, read from installed packages.

- Proteins: the labelled sequence sets of `aaanalysis` (BSD-3-Clause),
  `aaanalysis/_data/benchmarks/SEQ_*.tsv`, with the columns `entry`,
  `gene`, `sequence` and `label`.
- A genome: the complete chromosome of *Corynebacterium diphtheriae*
  NCTC 11397 (GenBank NZ_LN831026.1, 2,463,666 bp) that `pyrodigal`
  (GPL-3.0-or-later) ships among its test data.

Nothing is copied into this repository: the files are found inside the
installed packages, without importing them, and read at run time. Install
both with `pip install keras-favor[data]` (or `pip install -e ".[data]"` in
a checkout).
"""

import csv
import gzip
import importlib.util
import pathlib
import zlib

import numpy as np

DATA_EXTRA = "pip install keras-favor[data]"
PROTEIN_SETS = {
    "soluble": "SEQ_SOLUBLE.tsv",
    "capsid": "SEQ_CAPSID.tsv",
    "tail": "SEQ_TAIL.tsv",
}
CHROMOSOME_FILE = "tests/data/GCF_001457455.1_NCTC11397_genomic.fna.gz"

# Protein tokens: 0 is padding, 1 the mask of the masked language model,
# 2 any residue other than the 20 standard amino acids (X, B, Z, U, O).
PAD, MASK, OTHER_RESIDUE = 0, 1, 2
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
PROTEIN_VOCABULARY = ["<pad>", "<mask>", "X"] + list(AMINO_ACIDS)
# Nucleotide tokens: 0 is padding, 1 to 4 the bases, 5 anything else (N).
BASES = "ACGT"
NUCLEOTIDE_VOCABULARY = ["<pad>"] + list(BASES) + ["N"]


class MissingDataPackage(ImportError):
    """A package that ships the data is not installed."""


def package_directory(package):
    """The directory of an installed package, found without importing it.

    Raises:
        MissingDataPackage: when `package` is not installed; the message
            names the `data` extra that installs it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackage(
            f"This example reads its sequences from the `{package}` package, "
            f"which is not installed. Install the `data` extra: "
            f'`{DATA_EXTRA}` (in a checkout: `pip install -e ".[data]"`).'
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def protein_file(name):
    """The path of one `aaanalysis` protein set, `name` a key of
    PROTEIN_SETS."""
    if name not in PROTEIN_SETS:
        raise ValueError(
            f"`name` must be one of {sorted(PROTEIN_SETS)}. Received: "
            f"name={name!r}"
        )
    path = (
        package_directory("aaanalysis")
        / "_data"
        / "benchmarks"
        / PROTEIN_SETS[name]
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"The installed aaanalysis has no {path.name} (looked for "
            f"{path}); the examples need aaanalysis>=1.1,<2: "
            f"`{DATA_EXTRA}`."
        )
    return path


def load_proteins(name):
    """One protein set as `(sequences, labels)`, each sequence once.

    A sequence listed more than once keeps its first row's label.

    Returns:
        A list of amino-acid strings and an int32 array of their labels.
    """
    sequences, labels, seen = [], [], set()
    with open(protein_file(name), newline="") as file:
        for row in csv.DictReader(file, delimiter="\t"):
            sequence = row["sequence"].strip().upper()
            if sequence and sequence not in seen:
                seen.add(sequence)
                sequences.append(sequence)
                labels.append(int(row["label"]))
    return sequences, np.asarray(labels, np.int32)


def sequence_split(sequence, validation_percent=10, test_percent=10):
    """`"train"`, `"validation"` or `"test"`, from a hash of the sequence.

    The split depends on the sequence alone, so a sequence that appears in
    several sets (or twice in one) is always in the same split: no sequence
    is in two splits.
    """
    bucket = zlib.crc32(sequence.encode("ascii")) % 100
    if bucket < validation_percent:
        return "validation"
    if bucket < validation_percent + test_percent:
        return "test"
    return "train"


def encode_protein(sequence):
    """Token ids (int32) of an amino-acid string."""
    table = np.full(256, OTHER_RESIDUE, np.int32)
    for index, residue in enumerate(AMINO_ACIDS):
        table[ord(residue)] = index + 3
    return table[np.frombuffer(sequence.encode("ascii"), np.uint8)]


def chromosome_path():
    path = package_directory("pyrodigal") / CHROMOSOME_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"The installed pyrodigal has no {CHROMOSOME_FILE} (looked for "
            f"{path}); the example needs pyrodigal>=3.7,<4: `{DATA_EXTRA}`."
        )
    return path


def load_chromosome():
    """The *C. diphtheriae* NCTC 11397 chromosome as nucleotide token ids.

    Returns:
        `(tokens, description)`: an int32 array of one token per base (1 to
        4 for A, C, G, T; 5 for any other letter) and the FASTA header.
    """
    with gzip.open(chromosome_path(), "rt") as file:
        text = file.read()
    header, _, body = text.partition("\n")
    if not header.startswith(">") or ">" in body:
        raise ValueError(
            f"{chromosome_path()} is not one FASTA record: the examples "
            "need pyrodigal>=3.7,<4."
        )
    letters = "".join(body.split()).upper().encode("ascii")
    table = np.full(256, len(NUCLEOTIDE_VOCABULARY) - 1, np.int32)
    for index, base in enumerate(BASES):
        table[ord(base)] = index + 1
    return table[np.frombuffer(letters, np.uint8)], header[1:].strip()
