"""`dccl simulate`: the whole device-cloud loop over MQTT on one machine.

  broker.py  an embedded Mosquitto for the run (or the one at --broker)
  fleet.py   devices from the dataset: ids, keys, replayed logs; agent-pool processes (edge_agent.pool)
  loop.py    the cloud's round loop: train, export, announce, ingest patches, MoMoDistill, evaluate
  report.py  the metrics table, report.md with plots, results.json
  cli.py     the command
"""
