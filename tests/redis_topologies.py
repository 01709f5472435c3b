"""Real Redis deployments for the tests, each on free loopback ports in its own temp directory:
a TLS server with an ACL user, Sentinel (a master, a replica and a sentinel) and a Cluster of three
masters (and replicas when asked). Built on ``support.RedisServer``; Debian's redis-server 7."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import subprocess
import time
from pathlib import Path
from typing import Any

from support import LOCALHOST, RedisServer, free_port


class TlsRedisServer(RedisServer):
    """TLS only (no plain port), clients not asked for certificates, and the ACL user ``user`` with
    ``password`` (the default user off). A throwaway CA signs the server's certificate."""

    def __init__(self, dir: Path, user: str = "flagproxy", password: str = "s3cret-pass") -> None:
        super().__init__(dir=dir)
        self.user, self.password = user, password
        self.ca_path, self.cert_path, self.key_path = make_certificates(self.dir)

    @property
    def url(self) -> str:
        """What flagproxy is given: rediss://, the ACL credentials, the CA as a query option."""
        return f"rediss://{self.user}:{self.password}@{LOCALHOST}:{self.port}/0?ssl_ca_certs={self.ca_path}"

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.cert_path),
            "--tls-key-file", str(self.key_path),
            "--tls-ca-cert-file", str(self.ca_path),
            "--tls-auth-clients", "no",
            "--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all",
            "--user", "default", "off",
        ]  # fmt: skip

    def client(self, decode: bool = True) -> Any:
        import redis

        client = redis.Redis(
            host=LOCALHOST,
            port=self.port,
            username=self.user,
            password=self.password,
            ssl=True,
            ssl_ca_certs=str(self.ca_path),
            decode_responses=decode,
            socket_timeout=5,
        )
        self._clients.append(client)
        return client

    def stop(self) -> None:
        self.kill()  # the plain-text SHUTDOWN of RedisServer.stop cannot reach a TLS-only port

    def wait_accepting(self, timeout: float = 10.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log()}")
            probe = self.client()
            with contextlib.suppress(redis.RedisError):
                if probe.ping():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"TLS redis-server on {self.port} not answering after {timeout}s")
            time.sleep(0.05)  # readiness polling of a subprocess, bounded by the deadline


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost it signed (a day's validity)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("flagproxy test CA"))
        .issuer_name(name("flagproxy test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(LOCALHOST))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOCALHOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, cert_path, key_path


class MasterServer(RedisServer):
    def command(self) -> list[str]:
        return [*super().command(), "--repl-diskless-sync-delay", "0"]  # replicas sync at once, not in 5 s


class ReplicaServer(RedisServer):
    def __init__(self, dir: Path, master_port: int) -> None:
        super().__init__(dir=dir)
        self.master_port = master_port

    def command(self) -> list[str]:
        return [*super().command(), "--replicaof", LOCALHOST, str(self.master_port)]

    def wait_synced(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = self.client()
        while client.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.port} not in sync after {timeout}s:\n{self.log()}")
            time.sleep(0.05)  # polling the replication link, bounded by the deadline


class SentinelServer(RedisServer):
    """``redis-server sentinel.conf --sentinel`` monitoring ``master`` as ``name`` (quorum 1, fast
    failure detection: half a second down is down)."""

    def __init__(self, dir: Path, name: str, master_port: int) -> None:
        super().__init__(dir=dir)
        self.name, self.master_port = name, master_port
        self.conf = self.dir / "sentinel.conf"

    def command(self) -> list[str]:
        self.conf.write_text(
            f"port {self.port}\nbind {LOCALHOST}\ndir {self.dir}\nlogfile {self.log_path}\n"
            f"sentinel monitor {self.name} {LOCALHOST} {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.name} 500\n"
            f"sentinel failover-timeout {self.name} 5000\n"
        )
        return ["redis-server", str(self.conf), "--sentinel"]

    def master_port_now(self) -> int | None:
        reply = self.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return int(reply[1]) if reply else None


def distinct_ports(servers: list[Any]) -> None:
    """``free_port`` can name the same port twice in a row (nothing held it in between): a server
    that then cannot bind would leave its port answered by another, and a test talking to the
    wrong server. Each gets its own."""
    taken: set[int] = set()
    for server in servers:
        while server.port in taken:
            server.port = free_port()
        taken.add(server.port)


class SentinelDeployment:
    """A master, one replica in sync and a sentinel that knows both."""

    def __init__(self, root: Path, name: str = "flags-master") -> None:
        self.name = name
        self.master = MasterServer(dir=root / "master")
        self.replica = ReplicaServer(root / "replica", self.master.port)
        self.sentinel = SentinelServer(root / "sentinel", name, self.master.port)
        distinct_ports([self.master, self.replica, self.sentinel])

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.sentinel.port}"

    def start(self) -> SentinelDeployment:
        self.master.start()
        self.replica.start()
        self.replica.wait_synced()
        self.sentinel.start()  # after the replica is in sync: its first INFO of the master lists it
        deadline = time.monotonic() + 10
        while not self.sentinel.client().execute_command("SENTINEL", "REPLICAS", self.name):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sentinel does not see the replica:\n{self.sentinel.log()}")
            time.sleep(0.05)  # polling the sentinel, bounded by the deadline
        return self

    def close(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.close()


class ClusterNode(RedisServer):
    def __init__(self, dir: Path) -> None:
        super().__init__(dir=dir)
        self.bus_port = free_port()  # the default, port + 10000, may be out of range or taken

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),
            "--cluster-config-file", str(self.dir / "nodes.conf"),
            "--cluster-node-timeout", "1000",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip


class RedisClusterDeployment:
    """``masters`` primaries (slots split by ``redis-cli --cluster create``) and, when asked, one
    replica for the primary of ``replica_for_key``'s slot."""

    def __init__(self, root: Path, masters: int = 3) -> None:
        self.nodes = [ClusterNode(dir=root / f"node{i}") for i in range(masters)]
        distinct_ports(self.nodes)
        taken = {node.port for node in self.nodes}
        for node in self.nodes:  # a bus port no node listens on either
            while node.bus_port in taken:
                node.bus_port = free_port()
            taken.add(node.bus_port)
        self.replica: ClusterNode | None = None
        self.root = root

    @property
    def url(self) -> str:
        return self.nodes[0].url.rsplit("/", 1)[0]  # any node; a cluster has database 0 only

    def start(self) -> RedisClusterDeployment:
        for node in self.nodes:
            node.start()
        addresses = [f"{LOCALHOST}:{node.port}" for node in self.nodes]
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for node in self.all_nodes():
                if node.running:
                    with contextlib.suppress(Exception):
                        info = str(node.client().execute_command("CLUSTER", "INFO"))
                        states.append("ok" if "cluster_state:ok" in info else "not ok")
            if states and all(state == "ok" for state in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after {timeout}s: {states}")
            time.sleep(0.05)  # polling the cluster state, bounded by the deadline

    def all_nodes(self) -> list[ClusterNode]:
        return [*self.nodes, *([self.replica] if self.replica else [])]

    def owner_of(self, key: str) -> ClusterNode:
        """The primary that serves ``key``'s slot now."""
        client = next(node for node in self.all_nodes() if node.running).client()
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        for node in self.all_nodes():
            if not node.running:
                continue
            with contextlib.suppress(Exception):
                info = node.client().execute_command("ROLE")
                if info[0] == "master" and self._serves(node, slot):
                    return node
        raise RuntimeError(f"no running primary serves slot {slot}")

    def _serves(self, node: ClusterNode, slot: int) -> bool:
        for start, end, primary, *_replicas in node.client().execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(primary[1]) == node.port
        return False

    def add_replica(self, of: ClusterNode) -> ClusterNode:
        """A replica of ``of`` (joined with CLUSTER MEET, then CLUSTER REPLICATE), in sync."""
        replica = ClusterNode(dir=self.root / "replica")
        replica.start()
        client = replica.client()
        client.execute_command("CLUSTER", "MEET", LOCALHOST, str(of.port), str(of.bus_port))
        node_id = of.client().execute_command("CLUSTER", "MYID")
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(Exception):
                client.execute_command("CLUSTER", "REPLICATE", node_id)
                if client.info("replication").get("master_link_status") == "up":
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster replica not in sync:\n{replica.log()}")
            time.sleep(0.1)  # polling the replication link, bounded by the deadline
        self.replica = replica
        return replica

    def close(self) -> None:
        for node in self.all_nodes():
            node.close()


__all__ = ["RedisClusterDeployment", "SentinelDeployment", "TlsRedisServer", "free_port"]
