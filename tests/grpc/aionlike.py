"""Microservices on AION's gRPC kanban API, driven the way AION's own client libraries drive it.

`KanbanConnection` follows latonaio/aion-related-python-library (docs/grpc.md, reference §5.1): one channel with
its keepalive options, `ReceiveKanban` with the service's init type, a non-daemon receive thread pumping the stream
into an unbounded queue, unary `SendKanban` calls without a deadline, a reconnect (new channel, same init type, so
a source gets a new seed) on a stream error, silence on a stream that ends with OK, and `close()` that sends the
terminate kanban and then joins the receive thread (it returns only when the runtime ends the stream).

`GoLike` follows the Go client `msclient` (§5.2): two connections (receive, send), `MSNUMBER`, 1 s deadlines on
unary calls, absent metadata by default, a terminate kanban whose `number` is a string, static kanbans.

Roles (argv[1]): source, transform, sink, go-source, go-sink, statics. The stubs come from
`grpc_tools.protoc` run by the test on transport/proto/status.proto (PYTHONPATH).
"""

import json
import os
import queue
import sys
import threading
import time

import grpc
from google.protobuf import json_format, struct_pb2

import status_pb2
import status_pb2_grpc

WITH_KANBAN = status_pb2.START_SERVICE
WITHOUT_KANBAN = status_pb2.START_SERVICE_WITHOUT_KANBAN


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class KanbanConnection:
    """AION's Python `KanbanConnection`, as far as the wire is concerned."""

    def __init__(self, addr, init_type, name, number):
        self.addr, self.init_type, self.name, self.number = addr, init_type, name, number
        self.q = queue.Queue()
        self.closing = False
        self._connect()
        self.thread = threading.Thread(target=self._receive)  # non-daemon, as the library's
        self.thread.start()

    def _connect(self):
        self.channel = grpc.insecure_channel(
            self.addr, options=[("grpc.keepalive_time_ms", 20000), ("grpc.keepalive_timeout_ms", 60000)]
        )
        grpc.channel_ready_future(self.channel).result(timeout=11)
        self.stub = status_pb2_grpc.KanbanStub(self.channel)
        init = status_pb2.InitializeService(initType=self.init_type, microserviceName=self.name, processNumber=self.number)
        self.stream = self.stub.ReceiveKanban(init)

    def _receive(self):
        delays = [1, 2, 4, 4, 4]
        while True:
            try:
                for k in self.stream:
                    self.q.put(k)
                log("receive stream ended with OK")
                return
            except grpc.RpcError as e:
                if self.closing:
                    return
                log("receive stream failed:", e.code())
                for d in delays:
                    time.sleep(d)
                    try:
                        self.channel.close()
                        self._connect()
                        break
                    except Exception as e2:  # noqa: BLE001 - as the library: retry, then give up
                        log("reconnect failed:", e2)
                else:
                    return

    def get_one_kanban(self):
        return self.q.get()

    def get_kanban_itr(self):
        while True:
            k = self.q.get()
            if k is None:
                return
            yield k

    def output_kanban(self, result=True, connection_key="default", output_data_path="", process_number=1,
                      file_list=None, metadata=None):
        m = status_pb2.StatusKanban(priorSuccess=result, connectionKey=connection_key, processNumber=process_number,
                                    dataPath=output_data_path, fileList=file_list or [])
        s = struct_pb2.Struct()
        s.update(metadata or {})
        m.metadata.CopyFrom(s)
        self.stub.SendKanban(status_pb2.Request(microserviceName=self.name, message=m))

    def close(self, complete=True):
        self.closing = True
        self.q.put(None)
        md = {"type": "terminate", "name": self.name, "number": self.number}
        self.output_kanban(result=complete, connection_key="service-broker" if complete else "",
                           process_number=self.number, metadata=md)
        self.thread.join()


def metadata(k):
    return json_format.MessageToDict(k.metadata) if k.HasField("metadata") else {}


def env_addr():
    return os.environ.get("KANBAN_ADDR", "aion-statuskanban:11010")


def main():
    role = sys.argv[1]
    name = os.environ.get("SERVICE", "")
    n = int(os.environ.get("MS_NUMBER", "1"))
    count = int(os.environ.get("COUNT", "10"))
    if role == "source":
        # Started without a kanban: reads its seed, then emits COUNT kanbans and closes.
        conn = KanbanConnection(env_addr(), WITHOUT_KANBAN, name, n)
        seed = conn.get_one_kanban()
        from dateutil import parser  # what the library uses on startAt

        parser.parse(seed.startAt)
        assert os.path.isdir(seed.dataPath), seed.dataPath
        assert seed.processNumber == n and seed.connectionKey == "", seed
        for i in range(1, count + 1):
            conn.output_kanban(metadata={"seq": i, "from": name}, process_number=n)
        conn.close(complete=True)
        log("source done")
    elif role == "transform":
        conn = KanbanConnection(env_addr(), WITH_KANBAN, name, n)
        slow = float(os.environ.get("SLOW_MS", "0")) / 1000
        for k in conn.get_kanban_itr():
            if slow:
                time.sleep(slow)
            md = metadata(k)
            md["double"] = md["seq"] * 2
            md["via"] = name
            conn.output_kanban(metadata=md, process_number=k.processNumber)
    elif role == "sink":
        out = os.environ["OUT"]
        conn = KanbanConnection(env_addr(), WITH_KANBAN, name, n)
        with open(out, "a") as f:
            for k in conn.get_kanban_itr():
                f.write(json.dumps({"md": metadata(k), "next": k.nextDeviceName, "pn": k.processNumber,
                                    "startAt": k.startAt}) + "\n")
                f.flush()
    elif role == "go-source":
        # The Go client: a receive and a send connection, MSNUMBER, 1 s deadlines, metadata absent by default,
        # the terminate kanban's number as a string.
        name_go = os.environ.get("GO_NAME", name)
        num = max(int(os.environ.get("MSNUMBER", "1")), 1)
        recv = grpc.insecure_channel(env_addr(), options=[("grpc.keepalive_time_ms", 10000),
                                                          ("grpc.keepalive_permit_without_calls", 1)])
        send = grpc.insecure_channel(env_addr(), options=[("grpc.keepalive_time_ms", 10000),
                                                          ("grpc.keepalive_permit_without_calls", 1)])
        stream = status_pb2_grpc.KanbanStub(recv).ReceiveKanban(
            status_pb2.InitializeService(initType=WITHOUT_KANBAN, microserviceName=name_go, processNumber=num))
        seed = next(stream)
        assert seed.processNumber == num
        stub = status_pb2_grpc.KanbanStub(send)
        for i in range(1, count + 1):
            m = status_pb2.StatusKanban(priorSuccess=True, connectionKey="default", processNumber=1)
            if i % 2 == 0:
                s = struct_pb2.Struct()
                s.update({"seq": i})
                m.metadata.CopyFrom(s)
            stub.SendKanban(status_pb2.Request(microserviceName=name_go, message=m), timeout=1)
        s = struct_pb2.Struct()
        s.update({"type": "terminate", "name": name_go, "number": str(num)})
        term = status_pb2.StatusKanban(priorSuccess=True, connectionKey="service-broker", processNumber=num)
        term.metadata.CopyFrom(s)
        stub.SendKanban(status_pb2.Request(microserviceName=name_go, message=term), timeout=1)
        recv.close()
        send.close()
        log("go-source done")
    elif role == "wedge":
        # A client whose stream broke and that never comes back, but stays alive (as the Python library can).
        ch = grpc.insecure_channel(env_addr())
        stream = status_pb2_grpc.KanbanStub(ch).ReceiveKanban(
            status_pb2.InitializeService(initType=WITHOUT_KANBAN, microserviceName=name, processNumber=n))
        next(stream)
        ch.close()
        log("wedged")
        while True:
            time.sleep(1000)
    else:
        log("unknown role", role)
        sys.exit(2)


if __name__ == "__main__":
    main()
