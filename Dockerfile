# vod-sr's images for docker-compose.yaml.
#
#   airflow   the official Airflow image plus vod-sr's requirements, every version pinned by constraints.txt; the
#             DAGs, include/ and plugins/ are mounted by compose (copy them in for an image that carries them)
#   emulator  the airflow stage plus what the local AWS emulator's instances need (the AWS CLI, ffmpeg) and moto,
#             for the compose `local` profile
#
# The last stage is the Airflow image, so a plain `docker build .` gives it too.
FROM apache/airflow:3.3.2-python3.11 AS airflow
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/vod-sr/
RUN pip install --no-cache-dir -r /opt/vod-sr/requirements.txt -c /opt/vod-sr/constraints.txt

FROM airflow AS emulator
# The emulated instances run the real AWS CLI (v1 from PyPI) and ffmpeg (imageio-ffmpeg's static build): the
# emulator links both into the instances' PATH from this Python environment (include/local_aws/server.py).
RUN pip install --no-cache-dir awscli imageio-ffmpeg "moto[server]" -c /opt/vod-sr/constraints.txt
# The emulator's code (compose mounts ./include over it, so edits apply without a rebuild).
COPY --chown=airflow:0 include/ /opt/airflow/include/
ENV PYTHONPATH=/opt/airflow
EXPOSE 5055
# Not Airflow's entrypoint (it waits for a metadata database); dumb-init passes signals on, as in the Airflow image.
ENTRYPOINT ["/usr/bin/dumb-init", "--"]
CMD ["python", "-m", "include.local_aws", "--host", "0.0.0.0", "--port", "5055"]

FROM airflow
