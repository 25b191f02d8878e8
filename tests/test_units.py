import pytest

from lmshare.errors import ConfigError
from lmshare.units import format_size, parse_address, parse_size


@pytest.mark.parametrize("text,expected", [
    ("8GiB", 8 * 1024**3), ("512MiB", 512 * 1024**2), ("1000", 1000), ("4kb", 4000),
    ("1.5GiB", int(1.5 * 1024**3)), ("64M", 64_000_000), ("2 GB", 2_000_000_000),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "eight gigs", "8XB", "-1GiB", "GiB"])
def test_bad_sizes_say_how_to_write_one(text):
    with pytest.raises(ConfigError, match="for example 8GiB"):
        parse_size(text)


def test_addresses():
    assert parse_address("10.0.0.1:7800") == ("10.0.0.1", 7800)
    assert parse_address("7800") == ("127.0.0.1", 7800)
    assert parse_address("[::1]:7800") == ("::1", 7800)
    for bad in ("host:", "host:port", "h:70000"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_address(bad)


def test_format_size():
    assert format_size(1536) == "1.5 KiB"
    assert format_size(12) == "12 B"
