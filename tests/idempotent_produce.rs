//! Broker idempotence end to end, with raw Kafka-protocol requests: InitProducerId, the same
//! Produce bytes sent twice, five in-flight batches resent out of order, fencing and sequence
//! errors, DescribeProducers, and producer ids that are never reused across restarts.

mod common;

use std::collections::BTreeSet;

use anyhow::{Context, ensure};
use bytes::{Bytes, BytesMut};
use common::{
    RawClient, TestRecord, create_topic, fetch_all, init_producer_id, produce_request,
    record_batch_with_producer, topic_name, value_text,
};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::describe_producers_request::TopicRequest;
use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use kafka_protocol::messages::{
    DescribeProducersRequest, InitProducerIdRequest, ProduceRequest, ProducerId, TransactionalId,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::Compression;
use semel::broker::{Broker, BrokerConfig, BrokerHandle};

async fn start_in(dir: &std::path::Path) -> anyhow::Result<BrokerHandle> {
    common::init_tracing();
    Ok(Broker::start(BrokerConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.to_path_buf(),
        ..BrokerConfig::default()
    })
    .await?)
}

/// A batch of `count` records tagged `tag`, from `producer` at `epoch` starting at `sequence`.
fn batch(tag: &str, count: usize, producer: (i64, i16), sequence: i32) -> anyhow::Result<Bytes> {
    let records: Vec<TestRecord> = (0..count)
        .map(|i| TestRecord::new(&format!("k{i}"), &format!("{tag}-{i}"), 1_700_000_000_000))
        .collect();
    record_batch_with_producer(
        &records,
        Compression::None,
        producer.0,
        producer.1,
        sequence,
    )
}

/// Encodes a Produce v9 request once, so the very same bytes can be sent again.
fn produce_bytes(
    client: &mut RawClient,
    topic: &str,
    batch: Bytes,
    acks: i16,
) -> anyhow::Result<Bytes> {
    Ok(client.encode(9, &produce_request(topic, 0, batch, acks))?.1)
}

async fn reply(client: &mut RawClient) -> anyhow::Result<PartitionProduceResponse> {
    let frame = client
        .read_frame()
        .await?
        .context("broker closed the connection")?;
    let (_, response) = RawClient::decode::<ProduceRequest>(9, frame)?;
    Ok(response.responses[0].partition_responses[0].clone())
}

#[tokio::test]
async fn the_same_produce_bytes_twice_store_one_copy_and_answer_the_original_offset()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = start_in(dir.path()).await?;
    let mut client = RawClient::connect(broker.local_addr()).await?;
    create_topic(&mut client, "once", 1).await?;
    let producer = init_producer_id(&mut client).await?;
    for (round, acks) in [(0, -1i16), (1, 1)] {
        let request = produce_bytes(
            &mut client,
            "once",
            batch(&format!("b{round}"), 3, producer, round * 3)?,
            acks,
        )?;
        client.send_frame(&request).await?;
        let first = reply(&mut client).await?;
        client.send_frame(&request).await?;
        let second = reply(&mut client).await?;
        ensure!(first.error_code == 0, "first send: {first:?}");
        ensure!(
            second.error_code == 0,
            "a duplicate is answered NONE: {second:?}"
        );
        ensure!(first.base_offset == i64::from(round) * 3);
        ensure!(
            second.base_offset == first.base_offset,
            "duplicate answered {} instead of the original {}",
            second.base_offset,
            first.base_offset
        );
    }
    let stored: Vec<String> = fetch_all(&mut client, "once", 0)
        .await?
        .iter()
        .map(value_text)
        .collect();
    ensure!(
        stored == ["b0-0", "b0-1", "b0-2", "b1-0", "b1-1", "b1-2"],
        "{stored:?}"
    );
    broker.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn five_in_flight_batches_resent_out_of_order_are_each_stored_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = start_in(dir.path()).await?;
    let mut client = RawClient::connect(broker.local_addr()).await?;
    create_topic(&mut client, "inflight", 1).await?;
    let producer = init_producer_id(&mut client).await?;
    // Five pipelined requests (what a client with max.in.flight=5 has outstanding).
    let mut requests = Vec::new();
    for i in 0..5 {
        let bytes = produce_bytes(
            &mut client,
            "inflight",
            batch(&format!("b{i}"), 2, producer, i * 2)?,
            -1,
        )?;
        client.send_frame(&bytes).await?;
        requests.push(bytes);
    }
    let mut offsets = Vec::new();
    for _ in 0..5 {
        let response = reply(&mut client).await?;
        ensure!(response.error_code == 0, "{response:?}");
        offsets.push(response.base_offset);
    }
    ensure!(offsets == [0, 2, 4, 6, 8], "{offsets:?}");
    // All five again, pipelined and out of order, as after a lost connection.
    let order = [3usize, 0, 4, 1, 2];
    for &i in &order {
        client.send_frame(&requests[i]).await?;
    }
    for &i in &order {
        let response = reply(&mut client).await?;
        ensure!(response.error_code == 0, "retry of batch {i}: {response:?}");
        ensure!(
            response.base_offset == offsets[i],
            "retry of batch {i} answered {} not {}",
            response.base_offset,
            offsets[i]
        );
    }
    let stored = fetch_all(&mut client, "inflight", 0).await?;
    ensure!(stored.len() == 10, "{} records stored", stored.len());
    // The next batch in sequence is appended; one that skips ahead is refused.
    let next = produce_bytes(&mut client, "inflight", batch("b5", 2, producer, 10)?, -1)?;
    client.send_frame(&next).await?;
    ensure!(reply(&mut client).await?.base_offset == 10);
    let gap = produce_bytes(&mut client, "inflight", batch("gap", 2, producer, 20)?, -1)?;
    client.send_frame(&gap).await?;
    let gap = reply(&mut client).await?;
    ensure!(
        gap.error_code == ResponseError::OutOfOrderSequenceNumber.code(),
        "{gap:?}"
    );
    // A batch older than the five cached ones is not a duplicate any more: OUT_OF_ORDER.
    client.send_frame(&requests[0]).await?;
    let too_old = reply(&mut client).await?;
    ensure!(
        too_old.error_code == ResponseError::OutOfOrderSequenceNumber.code(),
        "{too_old:?}"
    );
    ensure!(fetch_all(&mut client, "inflight", 0).await?.len() == 12);
    broker.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn epoch_bumps_fence_older_epochs_and_describe_producers_shows_the_state()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = start_in(dir.path()).await?;
    let mut client = RawClient::connect(broker.local_addr()).await?;
    create_topic(&mut client, "fence", 1).await?;
    let (id, _) = init_producer_id(&mut client).await?;
    let send = |bytes: Bytes| produce_request("fence", 0, bytes, -1);
    let response = client.send(9, &send(batch("e0", 2, (id, 0), 0)?)).await?;
    ensure!(response.responses[0].partition_responses[0].error_code == 0);
    // A new epoch must start at sequence 0 ...
    let response = client.send(9, &send(batch("e1", 2, (id, 1), 2)?)).await?;
    ensure!(
        response.responses[0].partition_responses[0].error_code
            == ResponseError::OutOfOrderSequenceNumber.code()
    );
    let response = client.send(9, &send(batch("e1", 2, (id, 1), 0)?)).await?;
    ensure!(response.responses[0].partition_responses[0].error_code == 0);
    // ... and the old epoch is fenced from then on.
    let response = client
        .send(9, &send(batch("zombie", 2, (id, 0), 2)?))
        .await?;
    ensure!(
        response.responses[0].partition_responses[0].error_code
            == ResponseError::InvalidProducerEpoch.code()
    );
    let described = client
        .send(
            0,
            &DescribeProducersRequest::default().with_topics(vec![
                TopicRequest::default()
                    .with_name(topic_name("fence"))
                    .with_partition_indexes(vec![0, 7]),
            ]),
        )
        .await?;
    let partitions = &described.topics[0].partitions;
    ensure!(partitions[0].error_code == 0);
    let producers = &partitions[0].active_producers;
    ensure!(producers.len() == 1, "{producers:?}");
    ensure!(producers[0].producer_id.0 == id);
    ensure!(producers[0].producer_epoch == 1);
    ensure!(producers[0].last_sequence == 1);
    ensure!(producers[0].last_timestamp > 0);
    ensure!(partitions[1].error_code == ResponseError::UnknownTopicOrPartition.code());
    let stored: Vec<String> = fetch_all(&mut client, "fence", 0)
        .await?
        .iter()
        .map(value_text)
        .collect();
    ensure!(stored == ["e0-0", "e0-1", "e1-0", "e1-1"], "{stored:?}");
    broker.shutdown().await;
    Ok(())
}

/// An idempotent (not transactional) producer id sending a transactional batch: refused, and
/// nothing stored. Without a transactional id in the request Kafka's answer,
/// TRANSACTIONAL_ID_AUTHORIZATION_FAILED; naming a transactional id the producer id does not
/// belong to, INVALID_TXN_STATE (no transaction of it has added the partition).
#[tokio::test]
async fn a_transactional_batch_outside_any_transaction_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = start_in(dir.path()).await?;
    let mut client = RawClient::connect(broker.local_addr()).await?;
    create_topic(&mut client, "txn", 1).await?;
    let (id, epoch) = init_producer_id(&mut client).await?;
    let mut bytes = BytesMut::from(&batch("t", 1, (id, epoch), 0)?[..]);
    bytes[22] |= 0x10; // attributes: transactional
    let crc = crc32c::crc32c(&bytes[21..]);
    bytes[17..21].copy_from_slice(&crc.to_be_bytes());
    let bytes = bytes.freeze();
    for (transactional_id, expected) in [
        (None, ResponseError::TransactionalIdAuthorizationFailed),
        (Some("not-its-own"), ResponseError::InvalidTxnState),
    ] {
        let request = produce_request("txn", 0, bytes.clone(), -1).with_transactional_id(
            transactional_id.map(|t| TransactionalId(StrBytes::from_static_str(t))),
        );
        let response = client.send(9, &request).await?;
        let partition = &response.responses[0].partition_responses[0];
        ensure!(
            partition.error_code == expected.code(),
            "{transactional_id:?}: {partition:?}"
        );
    }
    ensure!(fetch_all(&mut client, "txn", 0).await?.is_empty());
    broker.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn producer_ids_are_never_reused_and_transactional_ids_bump_epochs_across_restarts()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let transactional = |epoch_check: Option<(i64, i16)>| {
        let (id, epoch) = epoch_check.unwrap_or((-1, -1));
        InitProducerIdRequest::default()
            .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("orders"))))
            .with_transaction_timeout_ms(60_000)
            .with_producer_id(ProducerId(id))
            .with_producer_epoch(epoch)
    };
    let mut seen = BTreeSet::new();
    let broker = start_in(dir.path()).await?;
    let mut client = RawClient::connect(broker.local_addr()).await?;
    for _ in 0..3 {
        let (id, epoch) = init_producer_id(&mut client).await?;
        ensure!(epoch == 0 && seen.insert(id), "id {id} epoch {epoch}");
    }
    let first = client.send(4, &transactional(None)).await?;
    let second = client.send(4, &transactional(None)).await?;
    ensure!(first.error_code == 0 && second.error_code == 0);
    ensure!(second.producer_id == first.producer_id);
    ensure!((first.producer_epoch, second.producer_epoch) == (0, 1));
    let bad_timeout = client
        .send(4, &transactional(None).with_transaction_timeout_ms(0))
        .await?;
    ensure!(bad_timeout.error_code == ResponseError::InvalidTransactionTimeout.code());
    broker.shutdown().await;

    let broker = start_in(dir.path()).await?;
    let mut client = RawClient::connect(broker.local_addr()).await?;
    for _ in 0..3 {
        let (id, _) = init_producer_id(&mut client).await?;
        ensure!(seen.insert(id), "producer id {id} was handed out twice");
    }
    let pid = first.producer_id.0;
    let third = client.send(4, &transactional(Some((pid, 1)))).await?;
    ensure!(third.error_code == 0, "{third:?}");
    ensure!(third.producer_id.0 == pid && third.producer_epoch == 2);
    // A zombie still at epoch 0 is fenced: PRODUCER_FENCED from v4, INVALID_PRODUCER_EPOCH before.
    let zombie = client.send(4, &transactional(Some((pid, 0)))).await?;
    ensure!(zombie.error_code == ResponseError::ProducerFenced.code());
    let zombie = client.send(3, &transactional(Some((pid, 0)))).await?;
    ensure!(zombie.error_code == ResponseError::InvalidProducerEpoch.code());
    broker.shutdown().await;
    Ok(())
}
