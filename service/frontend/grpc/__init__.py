"""The gRPC front end: the Open Inference Protocol's GRPCInferenceService, grpc.health.v1 and
reflection, in a process of its own (`python -m service.frontend.grpc`) that gunicorn's master
starts and restarts beside the HTTP workers, and that feeds the same runners."""
