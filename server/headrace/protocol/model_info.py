"""Model metadata, configuration and statistics messages built from Headrace's own records."""

from __future__ import annotations

from collections.abc import Sequence

from headrace.batching import BatchPolicy
from headrace.protocol import grpc_service_pb2 as pb
from headrace.protocol import model_config_pb2 as config_pb
from headrace.spec import ModelSpec
from headrace.statistics import Duration, ModelStatistics

_TensorMetadata = pb.ModelMetadataResponse.TensorMetadata


def metadata_to_proto(spec: ModelSpec, versions: Sequence[str]) -> pb.ModelMetadataResponse:
    """ModelMetadata: shapes include the batch dimension as -1, as Triton reports them."""
    return pb.ModelMetadataResponse(
        name=spec.name,
        versions=list(versions),
        platform=spec.platform,
        inputs=[
            _TensorMetadata(name=t.name, datatype=t.datatype.name, shape=spec.wire_shape(t))
            for t in spec.inputs
        ],
        outputs=[
            _TensorMetadata(name=t.name, datatype=t.datatype.name, shape=spec.wire_shape(t))
            for t in spec.outputs
        ],
    )


def config_to_proto(spec: ModelSpec, batching: BatchPolicy | None = None) -> config_pb.ModelConfig:
    """ModelConfig: dims exclude the batch dimension, as in Triton's config.pbtxt;
    `dynamic_batching` describes Headrace's batcher when the model has one."""
    config = config_pb.ModelConfig(
        name=spec.name,
        platform=spec.platform,
        backend=spec.backend,
        max_batch_size=spec.max_batch_size,
        input=[
            config_pb.ModelInput(
                name=t.name,
                data_type=t.datatype.config_type,  # type: ignore[arg-type]
                dims=t.dims,
                optional=t.optional,
            )
            for t in spec.inputs
        ],
        output=[
            config_pb.ModelOutput(
                name=t.name,
                data_type=t.datatype.config_type,  # type: ignore[arg-type]
                dims=t.dims,
            )
            for t in spec.outputs
        ],
        instance_group=[
            config_pb.ModelInstanceGroup(kind=config_pb.ModelInstanceGroup.KIND_CPU, count=1)
        ],
    )
    if spec.version.isdigit():
        config.version_policy.specific.versions.append(int(spec.version))
    for key, value in spec.parameters.items():
        config.parameters[key].string_value = value
    if batching is not None:
        config.dynamic_batching.CopyFrom(
            config_pb.ModelDynamicBatching(
                preferred_batch_size=batching.preferred_batch_sizes,
                max_queue_delay_microseconds=round(batching.max_queue_delay_s * 1e6),
                priority_levels=batching.priority_levels,
                default_priority_level=batching.default_priority_level,
                default_queue_policy=config_pb.ModelQueuePolicy(
                    max_queue_size=batching.max_queue_size, allow_timeout_override=True
                ),
            )
        )
    return config


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def statistics_to_proto(spec: ModelSpec, statistics: ModelStatistics) -> pb.ModelStatistics:
    """One model version's cumulative statistics."""
    return pb.ModelStatistics(
        name=spec.name,
        version=spec.version,
        last_inference=statistics.last_inference_ms,
        inference_count=statistics.inference_count,
        execution_count=statistics.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(statistics.success),
            fail=_duration(statistics.fail),
            queue=_duration(statistics.queue),
            compute_input=_duration(statistics.compute_input),
            compute_infer=_duration(statistics.compute_infer),
            compute_output=_duration(statistics.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(batch.compute_input),
                compute_infer=_duration(batch.compute_infer),
                compute_output=_duration(batch.compute_output),
            )
            for size, batch in sorted(statistics.batches.items())
        ],
    )
