"""The project's Flower ClientApp with two test hooks, for tests/test_flower_kill.py (not a test module itself).

Every message goes to ``fedwhisper.federated.flower``'s own functions; before that, a ``train`` message

- appends ``<client>\\t<round>\\t<pid>`` to the file named by node_config ``journal`` (so a test can tell which
  rounds each site trained, across runs), and
- with node_config ``pause-round=N`` and ``pause-marker=PATH``, in round N writes this process's pid to PATH
  (atomically) and sleeps, so the test knows the node is mid-round and SIGKILLs it there.

The library has no such hook of its own; nothing else about the ClientApp changes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedwhisper.federated import flower

client_app = ClientApp()


@client_app.query()
def client_name(msg: Message, context: Context) -> Message:
    return flower.client_name(msg, context)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    cfg = context.node_config
    server_round = int(msg.content["config"]["server-round"])
    if "journal" in cfg:
        fd = os.open(str(cfg["journal"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{cfg['client']}\t{server_round}\t{os.getpid()}\n".encode())
        finally:
            os.close(fd)
    if int(cfg.get("pause-round", 0)) == server_round:
        marker = Path(str(cfg["pause-marker"]))
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(marker)
        time.sleep(300)  # the test kills this node long before; bounded so nothing outlives a broken test for long
    return flower.client_train(msg, context)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    return flower.client_evaluate(msg, context)
