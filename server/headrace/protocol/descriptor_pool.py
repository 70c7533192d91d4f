"""The descriptor pool Headrace's generated stubs register in.

Triton's Python stubs (tritonclient, pytriton) put the same `inference.*` message names in
protobuf's default pool; a second, different definition there fails at import. A pool of
Headrace's own lets both sets of stubs live in one process. gRPC server reflection is served
from this pool (see `headrace.frontend.server`).
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
