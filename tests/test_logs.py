"""Structured logging: JSON lines, and py-libp2p's routine warnings demoted below info."""

import json
import logging

from meshnode.logs import kv, setup_logging


def test_json_lines_and_demotion(capsys):
    setup_logging("info", as_json=True)
    logging.getLogger("meshnode.test").warning("real problem", extra=kv(peer="abc", n=3))
    logging.getLogger("libp2p.network.swarm").error("routine dial failure")
    logging.getLogger("libp2p.kad_dht.new_child").warning("routine dht noise")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [(x["level"], x["msg"], x["peer"], x["n"]) for x in lines] == [("warning", "real problem", "abc", 3)]


def test_debug_shows_demoted_libp2p_records(capsys):
    setup_logging("debug")
    logging.getLogger("libp2p.network.swarm").error("routine dial failure")
    err = capsys.readouterr().err
    assert "DEBUG" not in err and "debug" in err and "routine dial failure" in err
    setup_logging("info")
