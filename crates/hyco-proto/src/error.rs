//! Every error of this crate in one place, and [`ProtoError`] for callers that want one type.
//!
//! Each module keeps its own enum with one variant per reason (so callers can map reasons to
//! status codes in a `match`); [`ProtoError`] only wraps them, adding nothing. No message
//! includes a key, a signature or a whole token.

pub use crate::address::AddressError;
pub use crate::connection_string::ConnectionStringError;
pub use crate::control::ControlError;
pub use crate::entity::EntityError;
pub use crate::rights::RightsError;
pub use crate::sas::SasError;

/// Any error of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A SAS token was refused.
    #[error(transparent)]
    Sas(#[from] SasError),
    /// A connection string was refused.
    #[error(transparent)]
    ConnectionString(#[from] ConnectionStringError),
    /// A path, query, entity name or `host:port` was refused.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// A control-channel message was refused.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Endpoint metadata or an entity description was refused.
    #[error(transparent)]
    Entity(#[from] EntityError),
    /// A rights list was refused.
    #[error(transparent)]
    Rights(#[from] RightsError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_every_error_transparently() {
        let all: Vec<ProtoError> = vec![
            SasError::TooLong.into(),
            ConnectionStringError::MissingEndpoint.into(),
            AddressError::NotHc.into(),
            ControlError::TooDeep.into(),
            EntityError::NotFound.into(),
            RightsError::Empty.into(),
        ];
        let texts: Vec<String> = all.iter().map(ToString::to_string).collect();
        assert_eq!(texts[0], SasError::TooLong.to_string());
        assert_eq!(texts[4], EntityError::NotFound.to_string());
        assert_eq!(all.len(), 6);
        assert!(texts.iter().all(|t| !t.is_empty()));
    }
}
