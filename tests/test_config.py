"""Configuration layering and start-up validation (exit 2 naming the key)."""

import dataclasses
import subprocess

import pytest

from meshnode.config import ConfigError, load_config
from tests.helpers.nodeproc import ROOT, clean_env, meshnode_cmd


def test_precedence_defaults_file_env_cli(tmp_path):
    f = tmp_path / "n.toml"
    f.write_text('[protocol]\nchunk_bytes = 65536\nmax_tensors_per_message = 10\n[node]\nlog_level = "debug"\n')
    cfg = load_config(f, env={"MESHNODE_PROTOCOL_CHUNK_BYTES": "131072"},
                      overrides=["node.log_level=error"])
    assert cfg.protocol.chunk_bytes == 131072          # env beats file
    assert cfg.protocol.max_tensors_per_message == 10  # file beats default
    assert cfg.node.log_level == "error"               # CLI beats file
    assert cfg.host.max_connections_per_peer == 1      # default
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.protocol.chunk_bytes = 1  # frozen


def test_lists_from_env_and_cli():
    a = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWFE3of8tviKvwPEe1t66YmJMML7UNcx35UgjRwiNvK4GK"
    b = "/ip4/127.0.0.1/tcp/2/p2p/12D3KooWKjhBCjwmXadNrQJEHhby7KLkpajYLAzR4NsPM469UaCC"
    cfg = load_config(env={"MESHNODE_HOST_BOOTSTRAP": f"{a}, {b}"})
    assert cfg.host.bootstrap == [a, b]


@pytest.mark.parametrize("kwargs,key,source", [
    ({"env": {"MESHNODE_PROTOCOL_CHUNK_BYTES": "12"}}, "protocol.chunk_bytes", "environment"),
    ({"overrides": ["host.max_connections=lots"]}, "host.max_connections", "command line"),
    ({"overrides": ["control.host=0.0.0.0"]}, "control.host", "command line"),
    ({"env": {"MESHNODE_NOPE": "1"}}, "MESHNODE_NOPE", "environment"),
    ({"overrides": ["host.bootstrap=/ip4/127.0.0.1/tcp/4001"]}, "host.bootstrap", "command line"),
    ({"env": {"MESHNODE_HOST_LISTEN_ADDRS": "/ip9/nowhere"}}, "host.listen_addrs", "environment"),
    ({"overrides": ["transport.peer_paths=12D3KooWabc=fast"]}, "transport.peer_paths", "command line"),
    ({"overrides": ["dht.record_ttl_s=10", "dht.refresh_interval_s=20"]}, "dht.refresh_interval_s", "command line"),
])
def test_invalid_values_name_key_and_source(kwargs, key, source):
    with pytest.raises(ConfigError) as ei:
        load_config(**kwargs)
    assert ei.value.key == key and source in ei.value.source


def test_control_api_refuses_non_loopback():
    with pytest.raises(ConfigError, match="loopback"):
        load_config(env={}, overrides=["control.host=0.0.0.0"])


@pytest.mark.parametrize("toml,key", [
    ('[host]\nmax_conections = 5\n', "host.max_conections"),           # unknown key (typo)
    ('[protocol]\nchunk_bytes = "big"\n', "protocol.chunk_bytes"),    # wrong type
    ('[dht]\nrecord_ttl_s = -3\n', "dht.record_ttl_s"),               # out of range
])
def test_invalid_config_file_exits_2_naming_key(tmp_path, toml, key):
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    r = subprocess.run(meshnode_cmd() + ["run", "--config", str(f), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 2, r.stderr
    assert key in r.stderr and str(f) in r.stderr


def test_example_config_is_valid():
    cfg = load_config(ROOT / "configs" / "node.toml", env={})
    assert cfg.control.host == "127.0.0.1"


def test_cipher_names_match_the_protocol():
    from meshnode.config import CIPHER_NAMES
    from tensor_rpc import CIPHERS
    assert set(CIPHER_NAMES) == set(CIPHERS)


def test_example_config_lists_every_key_with_its_default():
    from meshnode.config_doc import render_toml
    assert (ROOT / "configs" / "node.toml").read_text() == render_toml()


def test_runtime_dtype_choices_are_the_runtimes_compute_dtypes():
    import dataclasses

    from meshnode.config import RuntimeSection
    from meshnode.runtime.dtypes import COMPUTE_DTYPES
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(RuntimeSection)}["dtype"]
    assert set(choices) == set(COMPUTE_DTYPES)
