"""Prints the serialized FileDescriptorProtos of the reference protos, as
shipped in the pinned PyPI packages, as JSON {file name: hex bytes}."""

import json

from indexify.proto import executor_api_pb2
from tensorlake.function_executor.proto import function_executor_pb2, status_pb2

print(json.dumps({
    m.DESCRIPTOR.name: m.DESCRIPTOR.serialized_pb.hex()
    for m in (executor_api_pb2, function_executor_pb2, status_pb2)
}))
