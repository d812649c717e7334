//! Account names and op keys: the two kinds of database key this crate defines.

use std::fmt;
use std::str::FromStr;

use kiln_protocol::{BuyerId, IdParseError, ProviderId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Who holds a balance. Written `buyer:kb<64 hex>`, `provider:<peer id>`,
/// `verifier:<peer id>` or `fee`; it serializes as that string (in JSON and in
/// the canonical binary encoding alike), so it works as a JSON map key and as
/// a database primary key.
///
/// Burned credits are not an account: nobody can withdraw them, so they are a
/// running total, [`Ledger::total_burned`](crate::Ledger::total_burned).
/// Stake bonds are not accounts either: see [`Bond`](crate::Bond).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AccountId {
    Buyer(BuyerId),
    Provider(ProviderId),
    /// A provider acting as a verifier (it re-executes sampled jobs); slash
    /// bounties are paid here, apart from what it earns running jobs.
    Verifier(ProviderId),
    /// The marketplace's fee account.
    Fee,
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Buyer(b) => write!(f, "buyer:{b}"),
            Self::Provider(p) => write!(f, "provider:{p}"),
            Self::Verifier(p) => write!(f, "verifier:{p}"),
            Self::Fee => f.write_str("fee"),
        }
    }
}

impl FromStr for AccountId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| IdParseError {
            kind: "account id",
            input: s.chars().take(80).collect(),
            reason,
        };
        match s.split_once(':') {
            None if s == "fee" => Ok(Self::Fee),
            Some(("buyer", rest)) => rest
                .parse()
                .map(Self::Buyer)
                .map_err(|e| err(e.to_string())),
            Some(("provider", rest)) => rest
                .parse()
                .map(Self::Provider)
                .map_err(|e| err(e.to_string())),
            Some(("verifier", rest)) => rest
                .parse()
                .map(Self::Verifier)
                .map_err(|e| err(e.to_string())),
            _ => Err(err(
                "expected `buyer:kb<64 hex>`, `provider:<peer id>`, `verifier:<peer id>` or `fee`"
                    .into(),
            )),
        }
    }
}

impl Serialize for AccountId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AccountId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An idempotency key: names the real-world event an [`Op`](crate::Op)
/// records (`lock:<job>`, `deposit:<payment tx id>`), 1 to
/// [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpKey(String);

impl OpKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for OpKey {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<String> for OpKey {
    fn from(s: String) -> Self {
        Self(s)
    }
}
