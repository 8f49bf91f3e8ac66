"""The package's declared metadata matches the files it ships."""

import configparser
import pathlib

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
    first_block = readme[readme.index("```sh") + 1:readme.index("```")]
    assert [line.split()[:2] for line in first_block] == [
        ["make", "demo"], ["make", "test"]
    ]
