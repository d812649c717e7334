//! # kiln-protocol
//!
//! The vocabulary every Kiln component speaks: identifiers, job specifications,
//! capability adverts, offers, receipts, the [`Signed`] envelope, and the one
//! canonical binary encoding ([`encoding`]).
//!
//! This is the leaf crate of the workspace. It has no async runtime, no
//! database, no HTTP and no Docker in it, so that anything (a provider node, the
//! coordinator, an auditor's tool, a future on-chain verifier) can depend on it
//! and agree byte-for-byte on what was signed.
//!
//! Reading order: [`ids`] (what things are called), [`keys`] (who signs),
//! [`signed`] (how signatures are scoped so they cannot be replayed elsewhere),
//! [`spec`] (what a buyer asks for), [`messages`] (what flows between parties),
//! [`content`] (how bytes are named), [`views`] (the REST API's JSON bodies).

pub mod bench;
pub mod content;
pub mod encoding;
pub mod gang;
pub mod ids;
pub mod image;
pub mod keys;
pub mod messages;
pub mod request_auth;
pub mod signed;
pub mod spec;
pub mod units;
pub mod views;

pub use bench::{
    BENCHMARK_VERSION, BenchmarkReport, Challenge, ChallengeId, ChallengeResponse, ChallengeSizes,
    CpuBench, Digest32, GemmEngine, GpuBench, MatmulProof, Precision, Sample,
};
pub use content::{ContentId, Manifest, ManifestEntry, ManifestError};
pub use gang::{GangMember, GangOffer, GangRelease, GangStart};
pub use ids::{BuyerId, IdParseError, JobId, Nonce, OfferId, ProviderId};
pub use image::{DagNode, ImageBlob, ImageManifest, OciConfig, OciDigest, OciPlatform};
pub use keys::{Keypair, PublicKey};
pub use messages::*;
pub use signed::{Signed, SignedMessage, VerifyError};
pub use spec::{Compare, ImageRef, JobSpec, NetworkMode, Resources, SpecError, Tolerance, Verify};
pub use units::{ByteSize, Credits, MilliCpu, Seconds, UnixMillis};
pub use views::{
    AccountView, AuditView, BalancesView, BlobKind, BlobListView, BlobView, CancelOutcome,
    CancelView, ErrorView, EventView, InfoView, JobListView, JobState, JobView, LedgerPageView,
    LedgerRowView, LogsView, MemberState, MemberView, MissingRequest, MissingView, OfferSort,
    OfferView, OffersView, OutputsView, ProviderAuditsView, ProviderView, ProvidersView, Role,
    StatementLineView, StatementView, UploadView, VerificationStatus, VerificationView,
};

/// What [`hex_id!`] expands to needs, for crates that use it.
#[doc(hidden)]
pub mod __private {
    pub use hex;
    pub use serde;
}

/// Version of the wire protocol; bumped on any incompatible change to a message.
pub const PROTOCOL_VERSION: u32 = 4;
