"""The package's declared metadata matches the files it ships."""

import configparser
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def metadata():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["metadata"]


def test_license_file_is_the_apache_license_that_setup_cfg_declares():
    assert metadata()["license"] == "Apache-2.0"
    assert metadata()["license_files"].split() == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text().splitlines()
    first_block = readme[readme.index("```sh") + 1 : readme.index("```")]
    assert [line.split()[:2] for line in first_block] == [
        ["make", "demo"],
        ["make", "test"],
    ]


@pytest.mark.parametrize(
    "path, most",
    [
        ("README.md", 300),
        ("BENCHMARKS.md", 400),
        ("examples/quickstart.py", 60),
    ],
)
def test_reader_facing_files_stay_within_their_length(path, most):
    """The README, BENCHMARKS.md and the quickstart are read in one sitting:
    at most 300, 400 and 60 lines."""
    lines = (ROOT / path).read_text().splitlines()
    assert len(lines) <= most, f"{path} has {len(lines)} lines, at most {most}"


def test_version_is_written_once_in_the_package():
    """setup.cfg reads the version from keras_favor/version.py, the one
    place it is written, and `keras_favor.__version__` is the same."""
    from setuptools.config.setupcfg import read_configuration

    import keras_favor
    from keras_favor import version

    assert metadata()["version"] == "attr: keras_favor.version.__version__"
    declared = read_configuration(ROOT / "setup.cfg")["metadata"]["version"]
    assert declared == version.__version__ == keras_favor.__version__
    assert not any(
        version.__version__ in path.read_text()
        for path in [ROOT / "setup.cfg", ROOT / "keras_favor" / "__init__.py"]
    )


def test_every_public_package_declares_all_its_public_names():
    """Each package's `__all__` lists names it has, and every public class
    or function it imports from its own modules."""
    import importlib
    import inspect

    names = ["keras_favor"] + [
        f"keras_favor.{path.parent.name}"
        for path in sorted((ROOT / "keras_favor").glob("*/__init__.py"))
    ]
    for name in names:
        package = importlib.import_module(name)
        assert hasattr(package, "__all__"), name
        assert all(hasattr(package, item) for item in package.__all__), name
        public = {
            key
            for key, value in vars(package).items()
            if not key.startswith("_")
            and (inspect.isclass(value) or inspect.isfunction(value))
            and value.__module__.startswith(name)
        }
        assert public <= set(package.__all__), (name, public)
