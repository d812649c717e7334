//! `GET /v1/providers`, served from a snapshot rather than rebuilt per
//! request: anyone may ask, as often as the request limits allow, and each
//! answer would otherwise read every live provider's advert and reputation.
//!
//! The snapshot (the JSON body itself) is rebuilt, by one request while
//! the others wait for it, when the ledger changed since it was built (so
//! `earned` is always current), when a provider in it has passed its
//! lease, or when it is older than [`MAX_AGE`] (new registrations and
//! reputation changes show within that).

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use kiln_contracts::AccountId;
use kiln_protocol::UnixMillis;
use kiln_protocol::views::ProvidersView;

use crate::AppState;
use crate::db::DbError;

/// The oldest snapshot served.
pub const MAX_AGE: Duration = Duration::from_secs(1);

struct Built {
    at: Instant,
    bank_version: u64,
    /// The earliest `last_seen` in it (`None`: it lists nobody).
    oldest_seen: Option<UnixMillis>,
    body: Bytes,
}

/// The provider listing's snapshot.
#[derive(Default)]
pub struct Listing {
    current: RwLock<Option<Arc<Built>>>,
    /// One rebuild at a time; the others wait and take its result.
    rebuilding: tokio::sync::Mutex<()>,
}

impl Listing {
    pub fn new() -> Self {
        Self::default()
    }

    fn fresh(&self, state: &AppState) -> Option<Bytes> {
        let b = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        let lease = crate::live::lease_start(state);
        let ok = b.bank_version == state.bank.version()
            && b.at.elapsed() < MAX_AGE
            && b.oldest_seen.is_none_or(|o| o.0 >= lease.0);
        ok.then(|| b.body.clone())
    }

    /// The `ProvidersView` of live providers, as JSON.
    pub async fn providers(&self, state: &AppState) -> Result<Bytes, DbError> {
        if let Some(body) = self.fresh(state) {
            return Ok(body);
        }
        let _one = self.rebuilding.lock().await;
        if let Some(body) = self.fresh(state) {
            return Ok(body);
        }
        // Read before the data: a change committed while it is read makes
        // the snapshot stale at once instead of hiding it.
        let (at, bank_version) = (Instant::now(), state.bank.version());
        let rows = state
            .db
            .providers_with_reputation(crate::live::lease_start(state))
            .await?;
        let earned = state
            .bank
            .read(|l| {
                rows.iter()
                    .map(|(p, _)| l.balance(&AccountId::Provider(p.advert.payload.provider)))
                    .collect::<Vec<_>>()
            })
            .await;
        let tflops: Vec<Option<u32>> = {
            let live = crate::live::lock(state);
            rows.iter()
                .map(|(p, _)| {
                    live.fleet
                        .index_of(&p.advert.payload.provider)
                        .and_then(|i| live.fleet.view(i).tflops)
                        .filter(|t| *t > 0)
                })
                .collect()
        };
        let view = ProvidersView {
            providers: rows
                .iter()
                .zip(earned)
                .zip(tflops)
                .map(|(((p, reputation), earned), tflops)| {
                    crate::views::provider(p, *reputation, earned, tflops)
                })
                .collect(),
        };
        let body = Bytes::from(serde_json::to_vec(&view).map_err(|e| DbError::Corrupt {
            table: "providers",
            reason: format!("cannot encode the listing: {e}"),
        })?);
        let built = Arc::new(Built {
            at,
            bank_version,
            oldest_seen: rows.iter().map(|(p, _)| p.last_seen).min(),
            body: body.clone(),
        });
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(built);
        Ok(body)
    }
}
