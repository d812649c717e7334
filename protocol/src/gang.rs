//! Multi-node gang jobs: the reserve → confirm-all → start protocol.
//!
//! A job with `resources.gang = k > 1` runs on `k` distinct nodes, all or
//! none. The coordinator sends each chosen node a [`GangOffer`] (its own
//! offer id, its rank, the gang's size and the peers' ranks); a node that
//! can take it *reserves* a slot and its GPUs and answers `Accepted`, but
//! starts nothing. Only once every node has accepted does the coordinator
//! send each a [`GangStart`]; if any refuses, times out or vanishes, every
//! node gets a [`GangRelease`] and the job goes back to the queue. A node
//! that hears no start within the offer's `hold_ms` releases by itself.
//!
//! Every message is signed by the coordinator under its own domain tag,
//! addressed to one provider and bound to one (job, offer) pair.

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, OfferId, ProviderId};
use crate::messages::JobOffer;
use crate::signed::SignedMessage;

/// Where one member of a gang sits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangMember {
    /// 0-based rank within the gang.
    pub rank: u32,
    pub provider: ProviderId,
    /// The member's multiaddrs, as its advert lists them.
    pub listen_addrs: Vec<String>,
}

/// The coordinator asks one node to *reserve* (not start) its part of a gang job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangOffer {
    /// The node's own offer: `offer.provider` is the addressee, and
    /// `offer.offer_id` names this member (every member has its own).
    pub offer: JobOffer,
    /// This node's rank (0-based).
    pub rank: u32,
    /// Nodes in the gang.
    pub size: u32,
    /// Every member, this one included, in rank order.
    pub members: Vec<GangMember>,
    /// How long the node holds the reservation waiting for [`GangStart`]
    /// before releasing it by itself.
    pub hold_ms: u64,
}

impl SignedMessage for GangOffer {
    const DOMAIN: &'static str = "kiln/gang-offer/v1";
}

impl GangOffer {
    /// Checks what a receiver can check without state: the rank and size
    /// agree with the member list, and the member at this rank is the addressee.
    pub fn check_shape(&self) -> Result<(), String> {
        let n = self.members.len();
        if self.size < 2 || n != self.size as usize {
            return Err(format!(
                "gang size {} does not match its {n} members (a gang has at least 2)",
                self.size
            ));
        }
        if self.rank >= self.size {
            return Err(format!(
                "rank {} is outside a gang of {}",
                self.rank, self.size
            ));
        }
        for (i, m) in self.members.iter().enumerate() {
            if m.rank as usize != i {
                return Err(format!(
                    "member {i} has rank {}; ranks must be 0..size in order",
                    m.rank
                ));
            }
        }
        if self.members[self.rank as usize].provider != self.offer.provider {
            return Err(format!(
                "rank {} names provider {}, but the offer is addressed to {}",
                self.rank, self.members[self.rank as usize].provider, self.offer.provider
            ));
        }
        if self.offer.spec.resources.gang != self.size {
            return Err(format!(
                "the job asks for gang = {}, the offer for {}",
                self.offer.spec.resources.gang, self.size
            ));
        }
        Ok(())
    }

    /// Environment variables the member's container gets (the `KILN_`
    /// prefix is reserved for Kiln, so a buyer cannot set them).
    pub fn env(&self) -> Vec<(String, String)> {
        let peers = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.rank, m.provider))
            .collect::<Vec<_>>()
            .join(",");
        vec![
            ("KILN_GANG_RANK".into(), self.rank.to_string()),
            ("KILN_GANG_SIZE".into(), self.size.to_string()),
            ("KILN_GANG_PEERS".into(), peers),
        ]
    }
}

/// Every member reserved: start the container now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangStart {
    pub job_id: JobId,
    pub offer_id: OfferId,
    pub provider: ProviderId,
}

impl SignedMessage for GangStart {
    const DOMAIN: &'static str = "kiln/gang-start/v1";
}

/// Give the reservation back (another member refused or vanished); start nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangRelease {
    pub job_id: JobId,
    pub offer_id: OfferId,
    pub provider: ProviderId,
    pub reason: String,
}

impl SignedMessage for GangRelease {
    const DOMAIN: &'static str = "kiln/gang-release/v1";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;
    use crate::signed::Signed;
    use crate::spec::JobSpec;
    use crate::{BuyerId, Credits, UnixMillis};

    fn offer(size: u32, rank: u32) -> (GangOffer, Vec<ProviderId>) {
        let ids: Vec<ProviderId> = (0..size)
            .map(|_| ProviderId::from_public_key(&Keypair::generate().public()))
            .collect();
        let mut spec = JobSpec::new("sha256:".to_string() + &"a".repeat(64), vec!["x".into()]);
        spec.resources.gang = size;
        let o = GangOffer {
            offer: JobOffer {
                offer_id: OfferId::random(),
                job_id: JobId::random(),
                provider: ids[rank as usize],
                owner: BuyerId::new(Keypair::generate().public()),
                spec,
                price_per_hour: Credits(1),
                sources: Vec::new(),
            },
            rank,
            size,
            members: ids
                .iter()
                .enumerate()
                .map(|(i, p)| GangMember {
                    rank: i as u32,
                    provider: *p,
                    listen_addrs: vec![],
                })
                .collect(),
            hold_ms: 1000,
        };
        (o, ids)
    }

    #[test]
    fn shape_checks() {
        let (ok, _) = offer(3, 1);
        assert_eq!(ok.check_shape(), Ok(()));
        type Mutation = Box<dyn Fn(&mut GangOffer)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("size", Box::new(|o| o.size = 4)),
            ("outside", Box::new(|o| o.rank = 3)),
            ("ranks must be", Box::new(|o| o.members.swap(0, 2))),
            ("addressed to", Box::new(|o| o.rank = 0)),
            (
                "asks for gang",
                Box::new(|o| o.offer.spec.resources.gang = 2),
            ),
        ];
        for (want, mutate) in cases {
            let mut o = ok.clone();
            mutate(&mut o);
            let err = o.check_shape().unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn env_names_rank_size_and_peers() {
        let (o, ids) = offer(2, 1);
        let env = o.env();
        assert_eq!(env[0], ("KILN_GANG_RANK".into(), "1".into()));
        assert_eq!(env[1], ("KILN_GANG_SIZE".into(), "2".into()));
        assert_eq!(env[2].1, format!("0={},1={}", ids[0], ids[1]));
    }

    #[test]
    fn gang_signatures_do_not_cross_domains() {
        let k = Keypair::generate();
        let (o, ids) = offer(2, 0);
        let start = GangStart {
            job_id: o.offer.job_id,
            offer_id: o.offer.offer_id,
            provider: ids[0],
        };
        let s = Signed::sign(&k, start, 60).unwrap();
        s.verify(UnixMillis::now()).unwrap();
        // The same fields signed as a release do not verify as a start.
        let bytes = crate::encoding::encode(&s).unwrap();
        let as_release: Result<Signed<GangRelease>, _> = crate::encoding::decode(&bytes);
        if let Ok(r) = as_release {
            assert!(r.verify(UnixMillis::now()).is_err());
        }
        let signed_offer = Signed::sign(&k, o, 60).unwrap();
        signed_offer.verify(UnixMillis::now()).unwrap();
    }
}
