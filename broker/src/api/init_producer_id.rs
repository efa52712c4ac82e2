//! InitProducerId (key 22): hands out producer ids and epochs for idempotent and transactional
//! producers ([`crate::producer_ids`]).
//!
//! - No transactional id: a new producer id at epoch 0, whatever id and epoch a v3+ request
//!   carries (Kafka does the same; the Java client bumps an idempotent producer's epoch
//!   locally).
//! - A transactional id: its producer id, with the epoch bumped, by the transaction
//!   coordinator ([`crate::transactions`]), which aborts a transaction the previous instance
//!   left open first; `transaction.timeout.ms` must
//!   be positive and at most `transaction.max.timeout.ms` (`INVALID_TRANSACTION_TIMEOUT`). A
//!   v3+ request naming a producer id and epoch that are no longer current is fenced:
//!   `PRODUCER_FENCED` from v4, `INVALID_PRODUCER_EPOCH` before (KIP-588).
//!
//! References: KIP-98, KIP-360, KIP-588; Kafka's `TransactionCoordinator.handleInitProducerId`.

use std::sync::Arc;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::{
    InitProducerIdRequest, InitProducerIdResponse, ProducerId, ResponseKind,
};

use super::Reply;

use crate::broker::BrokerState;
use crate::producer_ids::InitError;

pub(crate) fn handle(
    state: &Arc<BrokerState>,
    request: InitProducerIdRequest,
    version: i16,
) -> Reply {
    let state = Arc::clone(state);
    Reply::Later(Box::pin(async move {
        ResponseKind::InitProducerId(answer(&state, request, version).await)
    }))
}

async fn answer(
    state: &BrokerState,
    request: InitProducerIdRequest,
    version: i16,
) -> InitProducerIdResponse {
    let transactional_id = request.transactional_id.as_ref().map(|id| id.0.to_string());
    let outcome = match transactional_id.as_deref() {
        None => state.producer_ids.new_idempotent(),
        Some(transactional_id) => init_transactional(state, &request, transactional_id).await,
    };
    match outcome {
        Ok((producer_id, epoch)) => {
            tracing::debug!(?transactional_id, producer_id, epoch, "InitProducerId");
            InitProducerIdResponse::default()
                .with_producer_id(ProducerId(producer_id))
                .with_producer_epoch(epoch)
        }
        Err(InitError { code, message }) => {
            let code = if code == ResponseError::ProducerFenced && version < 4 {
                ResponseError::InvalidProducerEpoch
            } else {
                code
            };
            tracing::info!(error = ?code, %message, "InitProducerId refused");
            InitProducerIdResponse::default()
                .with_error_code(code.code())
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1)
        }
    }
}

async fn init_transactional(
    state: &BrokerState,
    request: &InitProducerIdRequest,
    transactional_id: &str,
) -> Result<(i64, i16), InitError> {
    if transactional_id.is_empty() {
        return Err(InitError {
            code: ResponseError::InvalidRequest,
            message: "transactional id must not be empty".into(),
        });
    }
    let max_ms =
        i64::try_from(state.config.transaction_max_timeout.as_millis()).unwrap_or(i64::MAX);
    let timeout_ms = i64::from(request.transaction_timeout_ms);
    if timeout_ms <= 0 || timeout_ms > max_ms {
        return Err(InitError {
            code: ResponseError::InvalidTransactionTimeout,
            message: format!(
                "transaction.timeout.ms {timeout_ms} must be between 1 and transaction.max.timeout.ms ({max_ms})"
            ),
        });
    }
    let expected =
        (request.producer_id.0 >= 0).then_some((request.producer_id.0, request.producer_epoch));
    state
        .transactions
        .init_producer_id(
            state,
            transactional_id,
            request.transaction_timeout_ms,
            expected,
        )
        .await
}
