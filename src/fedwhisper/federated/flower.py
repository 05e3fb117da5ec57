"""Federated rounds over Flower: a ``ServerApp`` whose strategy delegates the maths to ``federated/`` (client
selection, the merge engine, the server optimiser) and a ``ClientApp`` that trains with our trainer on the site's
own prepared data. Flower carries the messages; nothing here re-implements its transport.

Messages (Flower's Message API, ``flwr>=1.20``):

- ``query``: the server asks a node for its client name once (``node_config["client"]``), so the seeded
  selection picks clients by name, whatever node ids the SuperLink hands out;
- ``train``: the global model (``arrays``) and ``config`` {server-round, local-steps, proximal-mu}; the reply holds
  the trained model, ``metrics`` {num-examples, train_loss} and ``client`` {name};
- ``evaluate``: the global model; the reply holds {num-examples, eval_loss, eval_wer} on the site's validation split.

Each SuperNode's ``node_config`` names its site: ``client`` (the client name), ``data-root`` (the prepared data
folder holding ``<client>/train.arrow``), ``base-dir`` (a copy of the base model) and ``params`` (the site's
params.yaml, whose ``finetune`` section sets the local training).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedwhisper.errors import FederatedError
from fedwhisper.federated.aggregation import ClientUpdate, aggregate_round
from fedwhisper.federated.rounds import LocalClient, RoundRecord, pooled_eval, weighted_mean
from fedwhisper.federated.sampling import select_clients
from fedwhisper.federated.server_optimizer import ServerOptimizer
from fedwhisper.params import FederatedParams

log = logging.getLogger(__name__)


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


class FedWhisperStrategy(Strategy):
    """Flower strategy whose selection, aggregation and server step are ``federated/``'s.

    ``records`` holds one ``RoundRecord`` per finished round; ``on_round(record, state)`` runs after each one."""

    def __init__(self, fed: FederatedParams, *, evaluate: bool = True, work_dir: str | Path | None = None,
                 on_round: Callable[[RoundRecord, dict[str, torch.Tensor], ServerOptimizer], None] | None = None,
                 wait_for_nodes_s: float = 120.0, rounds_done: int = 0):
        self.fed, self.evaluate, self.work_dir, self.on_round = fed, evaluate, work_dir, on_round
        self.wait_for_nodes_s = wait_for_nodes_s
        self.optimizer = ServerOptimizer(fed.server_optimizer, fed.server_lr, fed.beta_1, fed.beta_2, fed.tau)
        self.rounds_done = rounds_done  # a resumed run: Flower's round 1 is our round rounds_done + 1
        self.names: dict[int, str] = {}  # node id -> client name
        self.current: dict[str, torch.Tensor] | None = None
        self.records: list[RoundRecord] = []
        self._sent: list[tuple[str, Message]] = []  # this round's train messages, by client name
        self._t0 = 0.0

    def summary(self) -> None:
        f = self.fed
        log.info("fedwhisper strategy: %s aggregation + %s server step (lr %g), %d local steps, FedProx mu %g, "
                 "fraction %g (min %d), seed %d", f.strategy, f.server_optimizer, f.server_lr, f.local_steps,
                 f.proximal_mu, f.fraction_fit, f.min_fit_clients, f.seed)

    # ---------------------------------------------------------------- nodes

    def _learn_names(self, grid: Grid) -> None:
        """Ask every node not yet known for its client name (a ``query`` message); wait for min_fit_clients."""
        deadline = time.monotonic() + self.wait_for_nodes_s
        while True:
            nodes = sorted(grid.get_node_ids())
            new = [n for n in nodes if n not in self.names]
            if new:
                replies = grid.send_and_receive(
                    [Message(content=RecordDict(), message_type="query", dst_node_id=n) for n in new],
                    timeout=self.wait_for_nodes_s)
                for reply in replies:
                    if reply.has_error():
                        log.warning("node %s did not say its client name: %s", reply.metadata.src_node_id,
                                    reply.error.reason)
                        continue
                    self.names[reply.metadata.src_node_id] = str(reply.content["client"]["name"])
            alive = {n for n in nodes if n in self.names}
            names = [self.names[n] for n in alive]
            if len(set(names)) != len(names):
                raise FederatedError(f"two SuperNodes say they are the same client ({sorted(names)}); give each "
                                     "node a distinct node_config client=...")
            if len(alive) >= self.fed.min_fit_clients:
                return
            if time.monotonic() > deadline:
                raise FederatedError(f"only {len(alive)} SuperNode(s) connected after {self.wait_for_nodes_s:.0f} s; "
                                     f"federated.min_fit_clients is {self.fed.min_fit_clients}")
            time.sleep(0.5)

    def _nodes_by_name(self, grid: Grid) -> dict[str, int]:
        self._learn_names(grid)
        connected = set(grid.get_node_ids())
        return {name: node for node, name in self.names.items() if node in connected}

    # ---------------------------------------------------------------- train

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.rounds_done
        self._t0 = time.monotonic()
        self.current = from_record(arrays)
        by_name = self._nodes_by_name(grid)
        chosen = select_clients(sorted(by_name), server_round, self.fed.fraction_fit, self.fed.min_fit_clients,
                                self.fed.seed)
        cfg = ConfigRecord({**dict(config), "server-round": server_round, "local-steps": self.fed.local_steps,
                            "proximal-mu": float(self.fed.proximal_mu)})
        log.info("round %d: training %s", server_round, ", ".join(chosen))
        self._sent = [(c, Message(content=RecordDict({"arrays": arrays, "config": cfg}), message_type="train",
                                  dst_node_id=by_name[c])) for c in chosen]
        return [msg for _, msg in self._sent]

    def _sent_to(self, reply: Message) -> str:
        """The client a reply answers. An error reply made by the SuperLink (a node that stopped sending
        heartbeats) comes from the SuperLink's node id, so it is matched by the message it replies to (the grid
        sets message ids on the messages it pushes)."""
        for name, msg in self._sent:
            if msg.metadata.message_id and msg.metadata.message_id == reply.metadata.reply_to_message_id:
                return name
        return self.names.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        server_round += self.rounds_done
        if self.current is None:
            raise FederatedError("internal: aggregate_train before configure_train")
        updates: list[ClientUpdate] = []
        failed = []
        answered = set()
        for reply in replies:
            if reply.has_error():
                name = self._sent_to(reply)
                answered.add(name)
                failed.append(f"{name}: {reply.error.reason}")
                continue
            m = reply.content["metrics"]
            updates.append(ClientUpdate(str(reply.content["client"]["name"]), from_record(reply.content["arrays"]),
                                        int(m["num-examples"]), float(m["train_loss"])))
            answered.add(updates[-1].name)
        failed += [f"{name}: no reply in time" for name, _ in self._sent if name not in answered]
        if failed:
            log.warning("round %d: %d client(s) failed: %s", server_round, len(failed), "; ".join(failed))
        if len(updates) < self.fed.min_fit_clients:
            raise FederatedError(f"round {server_round}: {len(updates)} client model(s) came back, fewer than "
                                 f"federated.min_fit_clients={self.fed.min_fit_clients}; the global model of round "
                                 f"{server_round - 1} is kept unchanged ({'; '.join(failed) or 'no replies'})")
        updates.sort(key=lambda u: u.name)
        merged, report = aggregate_round(server_round, self.current, updates, self.fed, self.work_dir)
        state = self.optimizer.step(server_round, self.current, merged)
        examples = [u.num_examples for u in updates]
        record = RoundRecord(
            server_round=server_round, clients=[u.name for u in updates],
            client_loss={u.name: u.train_loss for u in updates},
            client_examples={u.name: u.num_examples for u in updates},
            train_loss=weighted_mean([u.train_loss for u in updates], examples),
            merge={"weights": dict(zip(report.client_names, report.weights_used)),
                   "excluded": [n for n, x in zip(report.client_names, report.excluded) if x]})
        self.records.append(record)
        self.current = state
        if not self.evaluate:
            self._finish_round(record)
        return to_record(state), MetricRecord({"train_loss": record.train_loss,
                                               "num-examples": int(sum(examples))})

    # ---------------------------------------------------------------- evaluate

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.evaluate:
            return []
        by_name = self._nodes_by_name(grid)
        cfg = ConfigRecord({**dict(config), "server-round": server_round + self.rounds_done})
        return [Message(content=RecordDict({"arrays": arrays, "config": cfg}), message_type="evaluate",
                        dst_node_id=node) for _, node in sorted(by_name.items())]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        if not self.evaluate:  # the round was finished in aggregate_train
            return None
        results = []
        for reply in replies:
            if reply.has_error():
                log.warning("round %d: evaluation failed on node %s: %s", server_round,
                            reply.metadata.src_node_id, reply.error.reason)
                continue
            m = reply.content["metrics"]
            if int(m["num-examples"]) > 0:
                results.append({"eval_loss": float(m["eval_loss"]), "eval_wer": float(m["eval_wer"]),
                                "eval_items": float(m["num-examples"])})
        record = self.records[-1]
        record.eval_loss, record.eval_wer = pooled_eval(results)
        self._finish_round(record)
        if record.eval_wer is None:
            return None
        return MetricRecord({"eval_loss": record.eval_loss, "eval_wer": record.eval_wer})

    def _finish_round(self, record: RoundRecord) -> None:
        record.seconds = time.monotonic() - self._t0
        wer = f"{record.eval_wer:.1f}%" if record.eval_wer is not None else "n/a"
        log.info("round %d: %s trained (loss %.3f), validation WER %s, %.0f s", record.server_round,
                 ", ".join(record.clients), record.train_loss, wer, record.seconds)
        if self.on_round is not None and self.current is not None:
            self.on_round(record, self.current, self.optimizer)


# --------------------------------------------------------------------------- client side

_SITES: dict[tuple[str, str, str, str], LocalClient] = {}


def site_from_config(node_config: Mapping) -> LocalClient:
    """The node's ``LocalClient`` (model template and data loaded once per process)."""
    from fedwhisper.params import load_params

    try:
        client = str(node_config["client"])
    except KeyError:
        raise FederatedError("SuperNode node_config has no 'client'; start it with --node-config "
                             "\"client='<name>' data-root='data/prepared' base-dir='models/base'\"") from None
    data_root = str(node_config.get("data-root", "data/prepared"))
    base_dir = str(node_config.get("base-dir", "models/base"))
    params = str(node_config.get("params", "params.yaml"))
    key = (client, data_root, base_dir, params)
    if key not in _SITES:
        ft = load_params(params, stage="federate").finetune if Path(params).exists() else None
        if ft is None:
            raise FederatedError(f"{params}: the site's params file is missing (node_config params=...)")
        _SITES[key] = LocalClient(ft, client, base_dir, data_root)
    return _SITES[key]


client_app = ClientApp()


@client_app.query()
def client_name(msg: Message, context: Context) -> Message:
    return Message(content=RecordDict({"client": ConfigRecord({"name": str(context.node_config["client"])})}),
                   reply_to=msg)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    site = site_from_config(context.node_config)
    cfg = msg.content["config"]
    update = site.train(int(cfg["server-round"]), from_record(msg.content["arrays"]), int(cfg["local-steps"]),
                        float(cfg["proximal-mu"]))
    content = RecordDict({
        "arrays": to_record(update.state),
        "metrics": MetricRecord({"num-examples": update.num_examples, "train_loss": update.train_loss}),
        "client": ConfigRecord({"name": site.name}),
    })
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    site = site_from_config(context.node_config)
    out = site.evaluate(from_record(msg.content["arrays"]))
    metrics = {"num-examples": 0, "eval_loss": 0.0, "eval_wer": 0.0} if out is None else {
        "num-examples": int(out["eval_items"]), "eval_loss": out["eval_loss"], "eval_wer": out["eval_wer"]}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# --------------------------------------------------------------------------- one process, no SuperLink

class InProcessGrid(Grid):
    """A Flower ``Grid`` that hands each message to ``client_app`` in this process, one node per site config.

    It runs the same ServerApp strategy and ClientApp functions as a deployment, with Flower's messages and records,
    but without a SuperLink, SuperNodes or Ray (Flower's simulation engine needs Ray, which the project does not
    install). A client that raises becomes an error reply, as on a SuperNode."""

    def __init__(self, node_configs: Sequence[Mapping], app: ClientApp | None = None, run_id: int = 1):
        self.app = app or client_app
        self.nodes = {1000 + i: dict(cfg) for i, cfg in enumerate(node_configs)}
        self._run = None
        self.run_id = run_id
        self.contexts = {n: Context(run_id=run_id, node_id=n, node_config=cfg, state=RecordDict(), run_config={})
                         for n, cfg in self.nodes.items()}
        self.down: set[int] = set()  # nodes that no longer answer (tests: a site dropping out)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.nodes if n not in self.down]

    def push_messages(self, messages):  # pragma: no cover - send_and_receive is the only path used
        raise NotImplementedError("InProcessGrid answers in send_and_receive")

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError("InProcessGrid answers in send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from flwr.app import Error

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.down or node not in self.nodes:
                continue  # no reply, as from a SuperNode that went away
            try:
                replies.append(self.app(msg, self.contexts[node]))
            except Exception as exc:  # noqa: BLE001 - a failing client is an error reply, as on a SuperNode
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies


def ensure_task_identity(run_id: int = 1) -> None:
    """Flower's Message needs the run/node/task identity that a SuperLink-started ServerApp has; set it for a
    strategy driven in this process (InProcessGrid) when nothing set it."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        if getattr(TaskIdentity, attr) is None:
            setattr(TaskIdentity, attr[1:], run_id if attr == "_run_id" else 0)


# --------------------------------------------------------------------------- server side

def show_logs_in_flower_process() -> None:
    """A ServerApp process that Flower starts has no logging set up but Flower's own, so fedwhisper's INFO lines
    (which clients a round trains, a resume) went nowhere; hand them to Flower's console handler, which
    ``flwr run --stream`` and ``flwr log`` carry. A process that set up logging itself (the DVC stage, pytest) is
    left as it is."""
    ours = logging.getLogger("fedwhisper")
    if ours.handlers or logging.getLogger().handlers:
        return
    from flwr.common.logger import console_handler

    ours.addHandler(console_handler)
    ours.setLevel(logging.INFO)


def run_server(grid: Grid, fed: FederatedParams, initial_state: Mapping[str, torch.Tensor], *,
               evaluate: bool = True, work_dir: str | Path | None = None,
               on_round: Callable[[RoundRecord, dict[str, torch.Tensor], ServerOptimizer], None] | None = None,
               timeout_s: float = 3600.0, wait_for_nodes_s: float = 120.0, rounds_done: int = 0,
               optimizer_state: Optional[dict] = None,
               ) -> tuple[dict[str, torch.Tensor], list[RoundRecord]]:
    """Rounds ``rounds_done + 1 .. fed.rounds`` over ``grid`` from ``initial_state`` (the global model after
    ``rounds_done`` rounds, with the server optimiser's ``optimizer_state``); returns the final global model and one
    record per round run here."""
    show_logs_in_flower_process()
    if rounds_done:
        log.info("resuming after round %d of %d (the server optimiser's state restored)", rounds_done, fed.rounds)
    strategy = FedWhisperStrategy(fed, evaluate=evaluate, work_dir=work_dir, on_round=on_round,
                                  wait_for_nodes_s=wait_for_nodes_s, rounds_done=rounds_done)
    if optimizer_state:
        strategy.optimizer.load_state(optimizer_state)
    todo = fed.rounds - rounds_done
    if todo <= 0:
        return dict(initial_state), []
    result = strategy.start(grid=grid, initial_arrays=to_record(initial_state), num_rounds=todo, timeout=timeout_s)
    if len(strategy.records) != todo:
        raise FederatedError(f"only {len(strategy.records)} of rounds {rounds_done + 1}..{fed.rounds} finished")
    return from_record(result.arrays), strategy.records
