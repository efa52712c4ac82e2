#!/usr/bin/env python3
"""kafka-python and confluent-kafka, clients we did not write, against a SASL_SSL semel-broker.

Usage: kafka_python_sasl.py BOOTSTRAP CA_PEM

kafka-python (pure Python) produces three records as alice over TLS with SCRAM-SHA-256
(acks=all), reads them back with SCRAM-SHA-512, then checks that a wrong password is refused
with the broker's authentication error rather than served. confluent-kafka (librdkafka 2.6.1
or newer, whose SCRAM nonce is the exact one RFC 5802 asks for) produces one record with
SCRAM-SHA-512. Prints "round trip ok", "wrong password refused" and "confluent-kafka ok";
exits non-zero with the reason otherwise.
"""
import logging
import sys

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError


def secured(mechanism, password):
    return dict(
        bootstrap_servers=sys.argv[1],
        security_protocol="SASL_SSL",
        ssl_cafile=sys.argv[2],
        sasl_mechanism=mechanism,
        sasl_plain_username="alice",
        sasl_plain_password=password,
        request_timeout_ms=10000,
    )


def main():
    producer = KafkaProducer(acks="all", **secured("SCRAM-SHA-256", "alice-secret"))
    sent = [b"python-%d" % n for n in range(3)]
    for value in sent:
        producer.send("kafka-python-sasl", value=value, partition=0).get(timeout=20)
    producer.close(timeout=10)

    consumer = KafkaConsumer(consumer_timeout_ms=10000, **secured("SCRAM-SHA-512", "alice-secret"))
    partition = TopicPartition("kafka-python-sasl", 0)
    consumer.assign([partition])
    consumer.seek_to_beginning(partition)
    got = []
    for record in consumer:
        got.append(record.value)
        if len(got) == len(sent):
            break
    consumer.close()
    if got != sent:
        sys.exit(f"read {got!r}, sent {sent!r}")
    print("round trip ok")

    # kafka-python logs the broker's refusal and keeps trying to bootstrap until max_block_ms;
    # the refusal must be the broker's authentication error, not a mere timeout.
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logging.getLogger("kafka").setLevel(logging.DEBUG)
    logging.getLogger("kafka").addHandler(Collect())
    try:
        refused = KafkaProducer(max_block_ms=5000, **secured("SCRAM-SHA-256", "wrong"))
        refused.send("kafka-python-sasl", value=b"never", partition=0).get(timeout=10)
    except KafkaError as error:
        refusals = [m for m in seen if "invalid credentials" in m]
        if not refusals:
            sys.exit(f"a wrong password failed without the broker's refusal: {error}; log: {seen}")
        print(f"wrong password refused: {refusals[0]}")
    else:
        sys.exit("a wrong password was served")

    import confluent_kafka

    errors = []
    producer = confluent_kafka.Producer({
        "bootstrap.servers": sys.argv[1],
        "security.protocol": "SASL_SSL",
        "ssl.ca.location": sys.argv[2],
        "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "alice",
        "sasl.password": "alice-secret",
        "enable.idempotence": True,
        "error_cb": lambda error: errors.append(str(error)),
    })
    delivered = []
    producer.produce("kafka-python-sasl", b"from confluent-kafka", partition=0,
                     on_delivery=lambda error, message: delivered.append(error))
    left = producer.flush(20)
    if left or delivered != [None] or errors:
        sys.exit(f"confluent-kafka {confluent_kafka.libversion()[0]}: left {left}, "
                 f"delivered {delivered}, errors {errors}")
    print(f"confluent-kafka ok (librdkafka {confluent_kafka.libversion()[0]})")


if __name__ == "__main__":
    main()
