"""A Hubble-API client generated from hopwatch's proto/ by grpcio-tools (not by hopwatch's own
Rust toolchain). It calls ServerStatus, GetNodes and GetFlows on a collector and prints what it
decoded as one JSON document, for the Rust side of the test to check.

usage: client.py GENERATED_DIR HOST:PORT
"""

import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from observer import observer_pb2, observer_pb2_grpc  # noqa: E402
from flow import flow_pb2  # noqa: E402


def main() -> None:
    channel = grpc.insecure_channel(sys.argv[2])
    stub = observer_pb2_grpc.ObserverStub(channel)
    status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
    nodes = stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=10)
    # Hubble's request shape: the last 5 flows to port 5432 that are not FORWARDED.
    request = observer_pb2.GetFlowsRequest(
        number=5,
        whitelist=[flow_pb2.FlowFilter(destination_port=["5432"])],
        blacklist=[flow_pb2.FlowFilter(verdict=[flow_pb2.FORWARDED])],
    )
    flows = []
    notices = []
    for resp in stub.GetFlows(request, timeout=10):
        kind = resp.WhichOneof("response_types")
        if kind == "flow":
            f = resp.flow
            flows.append({
                "uuid": f.uuid,
                "verdict": flow_pb2.Verdict.Name(f.verdict),
                "source": f.IP.source,
                "destination_port": f.l4.TCP.destination_port,
                "node_name": f.node_name,
                "time_seconds": f.time.seconds,
                "response_node_name": resp.node_name,
                # hopwatch additions decode as ordinary fields too.
                "connect_latency_ns": f.tcp_stats.connect_latency_ns,
            })
        else:
            notices.append(kind)
    bad = observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(source_ip=["10.0.0.0/99"])])
    try:
        list(stub.GetFlows(bad, timeout=10))
        invalid = "accepted"
    except grpc.RpcError as e:
        invalid = e.code().name
    print(json.dumps({
        "status": json_format.MessageToDict(status, preserving_proto_field_name=True),
        "nodes": [n.name for n in nodes.nodes],
        "flows": flows,
        "notices": notices,
        "invalid_filter": invalid,
    }))


if __name__ == "__main__":
    main()
