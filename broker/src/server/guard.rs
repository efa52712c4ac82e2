//! stub
/// e
#[derive(Debug, thiserror::Error)]
#[error("guard")]
pub struct GuardError;
/// c
pub fn check_request_body(_a: i16, _v: i16, _b: &[u8]) -> Result<(), GuardError> {
    Ok(())
}
