"""A GetFlows client generated from Cilium's published Hubble API, not from hopwatch's proto/.

The .proto files are written at run time from hopwatch-proto/src/cilium_api.tsv (facts
transcribed from Cilium's api/v1/flow/flow.proto and api/v1/observer/observer.proto: every
FlowFilter and GetFlowsRequest field with Cilium's name, number and type, including the
Cilium-only ones hopwatch does not declare), compiled with grpcio-tools, and used to send each
request given on standard input. Flows are decoded with Cilium's Flow numbering for the fields
the test reads (uuid, verdict, source.pod_name).

usage: cilium_client.py FACTS_TSV WORK_DIR HOST:PORT < requests.jsonl
Each input line: {"allowlist": [FlowFilter JSON...], "denylist": [...], "field_mask": [...]}.
Each output line: {"uuids": [...]} or {"error": "..."} for a filter Cilium's API cannot express
(a field hopwatch added) or a call that failed, and with a field mask, the flows as decoded.
"""

import json
import os
import subprocess
import sys


def load_facts(path):
    fields, enums = {}, {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        kind, owner, name, number, ty = line.rstrip("\n").split("\t")
        if kind == "field":
            fields.setdefault(owner, []).append((name, int(number), ty))
        elif kind == "enum":
            enums.setdefault(owner, []).append((name, int(number)))
        # "rpc" rows: the service is declared by hand below (GetFlows only).
    return fields, enums


def message(fields, full, keep=None, indent="", nested=""):
    short = full.split(".")[-1]
    out = [f"{indent}message {short} {{"]
    out.append(nested)
    for name, number, ty in fields[full]:
        if keep is not None and name not in keep:
            continue
        out.append(f"{indent}    {ty} {name} = {number};")
    out.append(f"{indent}}}")
    return "\n".join(out)


def enum(enums, full):
    short = full.split(".")[-1]
    values = "\n".join(f"    {n} = {v};" for n, v in enums[full])
    return f"enum {short} {{\n{values}\n}}"


def write_protos(facts, work):
    fields, enums = facts
    flow_msgs = [
        message(fields, "flow.Workload"),
        message(fields, "flow.HTTPHeader"),
        message(fields, "flow.NetworkInterface"),
        message(fields, "flow.TCPFlags"),
        message(fields, "flow.EventTypeFilter"),
        message(
            fields,
            "flow.FlowFilter",
            nested=message(fields, "flow.FlowFilter.Experimental", indent="    "),
        ),
        message(fields, "flow.Endpoint", keep={"namespace", "pod_name"}),
        message(fields, "flow.Flow", keep={"uuid", "verdict", "source"}),
    ]
    flow_enums = [enum(enums, e) for e in
                  ("flow.Verdict", "flow.TrafficDirection", "flow.IPVersion", "flow.DropReason")]
    os.makedirs(os.path.join(work, "flow"), exist_ok=True)
    os.makedirs(os.path.join(work, "observer"), exist_ok=True)
    with open(os.path.join(work, "flow", "flow.proto"), "w") as f:
        f.write('syntax = "proto3";\npackage flow;\n\n')
        f.write("\n\n".join(flow_enums + flow_msgs) + "\n")
    request = message(
        fields, "observer.GetFlowsRequest",
        keep={"number", "first", "follow", "blacklist", "whitelist", "since", "until",
              "field_mask"},
    )
    response = message(fields, "observer.GetFlowsResponse", keep={"flow", "node_name"})
    with open(os.path.join(work, "observer", "observer.proto"), "w") as f:
        f.write('syntax = "proto3";\npackage observer;\n\n'
                'import "google/protobuf/field_mask.proto";\n'
                'import "google/protobuf/timestamp.proto";\n'
                'import "flow/flow.proto";\n\n')
        f.write(request + "\n\n" + response + "\n\n")
        f.write("service Observer {\n"
                "    rpc GetFlows(GetFlowsRequest) returns (stream GetFlowsResponse) {}\n}\n")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", work, "--python_out", work,
         "--grpc_python_out", work, "flow/flow.proto", "observer/observer.proto"],
        check=True,
    )


def main():
    facts = load_facts(sys.argv[1])
    work = sys.argv[2]
    write_protos(facts, work)
    sys.path.insert(0, work)
    import grpc
    from google.protobuf import json_format
    from observer import observer_pb2, observer_pb2_grpc

    stub = observer_pb2_grpc.ObserverStub(grpc.insecure_channel(sys.argv[3]))
    for line in sys.stdin:
        spec = json.loads(line)
        request = observer_pb2.GetFlowsRequest(number=2**64 - 1)
        try:
            for f in spec.get("allowlist", []):
                json_format.Parse(f, request.whitelist.add())
            for f in spec.get("denylist", []):
                json_format.Parse(f, request.blacklist.add())
        except json_format.ParseError as e:
            print(json.dumps({"error": f"not expressible: {e}"}))
            continue
        if spec.get("field_mask"):
            request.field_mask.paths.extend(spec["field_mask"])
        try:
            flows = [r.flow for r in stub.GetFlows(request, timeout=10) if r.HasField("flow")]
        except grpc.RpcError as e:
            print(json.dumps({"error": e.code().name}))
            continue
        out = {"uuids": [f.uuid for f in flows]}
        if spec.get("field_mask"):
            out["flows"] = [json_format.MessageToDict(f, preserving_proto_field_name=True)
                            for f in flows]
        print(json.dumps(out))


if __name__ == "__main__":
    main()
