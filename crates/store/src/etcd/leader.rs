//! Leader election on an etcd lease, and writes fenced by it.
//!
//! A candidate leads while a key holds its id attached to its lease. The lease is kept alive
//! every third of its time to live; when it expires (the leader died, hung or was cut off)
//! etcd deletes the key and the next candidate's transaction wins. Every write of a leader
//! compares the key's lease with its own in the same transaction, so a deposed leader that does
//! not know it yet cannot change anything: two leaders never act at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{Compare, Etcd, EtcdError, KeyValue, Op, Result, TxnResult};

/// One process that wants to lead.
#[derive(Debug, Clone)]
pub struct Candidate {
    etcd: Etcd,
    key: String,
    id: String,
    ttl: Duration,
}

impl Candidate {
    /// Candidates for the same `key` compete; `id` names this one (a host's name).
    pub fn new(etcd: Etcd, key: impl Into<String>, id: impl Into<String>, ttl: Duration) -> Self {
        Self {
            etcd,
            key: key.into(),
            id: id.into(),
            ttl,
        }
    }

    /// Whoever leads now: the key's value and its lease.
    pub async fn leader(&self) -> Result<Option<KeyValue>> {
        self.etcd.get(&self.key).await
    }

    /// Waits until this candidate leads. Errors only when etcd cannot be used at all; the
    /// caller retries.
    pub async fn campaign(&self) -> Result<Leadership> {
        loop {
            let lease = self.etcd.grant(self.ttl).await?;
            let won = self
                .etcd
                .txn(
                    &[Compare::absent(self.key.as_str())],
                    &[Op::put_with_lease(
                        self.key.as_str(),
                        self.id.as_str(),
                        lease,
                    )],
                    &[Op::get(self.key.as_str())],
                )
                .await;
            let won = match won {
                Ok(won) => won,
                Err(e) => {
                    let _ = self.etcd.revoke(lease).await;
                    return Err(e);
                }
            };
            if won.succeeded {
                return Ok(Leadership::start(self.clone(), lease, won.revision));
            }
            let _ = self.etcd.revoke(lease).await;
            self.wait_for_vacancy(&won).await;
        }
    }

    /// Until the leader's key is deleted, or a time to live has passed (a watch on a member
    /// that lost its peers may hear nothing, so look again now and then).
    async fn wait_for_vacancy(&self, seen: &TxnResult) {
        let from = seen.revision + 1;
        let wait = async {
            let Ok(mut watch) = self.etcd.watch(&self.key, false, from).await else {
                tokio::time::sleep(self.ttl / 3).await;
                return;
            };
            while let Ok(batch) = watch.next().await {
                if batch.events.iter().any(|e| e.is_delete()) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(self.ttl, wait).await;
    }
}

/// The leadership of one candidate, until it resigns or its lease is lost.
#[derive(Debug)]
pub struct Leadership {
    inner: Arc<Inner>,
    lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Inner {
    candidate: Candidate,
    lease: i64,
    revision: i64,
}

impl Leadership {
    fn start(candidate: Candidate, lease: i64, revision: i64) -> Self {
        let inner = Arc::new(Inner {
            candidate,
            lease,
            revision,
        });
        let (tell, lost) = watch::channel(false);
        let keeper = tokio::spawn(keep(inner.clone(), tell));
        Self {
            inner,
            lost,
            keeper,
        }
    }

    /// The lease that holds the leader's key.
    pub fn lease(&self) -> i64 {
        self.inner.lease
    }

    /// The revision at which this leadership began: a term number that only grows.
    pub fn term(&self) -> i64 {
        self.inner.revision
    }

    /// The comparison that holds only while this candidate leads.
    pub fn fence(&self) -> Compare {
        Compare::lease(self.inner.candidate.key.as_str(), self.inner.lease)
    }

    /// Whether the lease is known to be gone (the fence decides; this is for stepping down
    /// early).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        let _ = lost.wait_for(|lost| *lost).await;
    }

    /// Runs `success` if this candidate still leads and every comparison holds; `Ok(false)`
    /// when a comparison of the caller's failed, `EtcdError::Deposed` when the fence did.
    pub async fn txn(&self, compare: &[Compare], success: &[Op]) -> Result<TxnResult> {
        let mut all = vec![self.fence()];
        all.extend_from_slice(compare);
        let key = self.inner.candidate.key.as_str();
        let etcd = &self.inner.candidate.etcd;
        let result = etcd.txn(&all, success, &[Op::get(key)]).await?;
        if !result.succeeded {
            let holder = result.reads.first().and_then(|kvs| kvs.first());
            if holder.is_none_or(|kv| kv.lease != self.inner.lease) {
                return Err(EtcdError::Deposed {
                    key: key.to_string(),
                    holder: holder.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
                });
            }
        }
        Ok(result)
    }

    /// Stops renewing the lease, as a hung leader would (tests).
    #[cfg(test)]
    pub(crate) fn hang(&self) {
        self.keeper.abort();
    }

    /// Gives the leadership up now, so that another candidate takes over at once.
    pub async fn resign(self) -> Result<()> {
        self.keeper.abort();
        self.inner.candidate.etcd.revoke(self.inner.lease).await
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Keeps the lease alive; says it is lost when etcd says so, or when no renewal got through
/// for a whole time to live (etcd may have let it expire meanwhile).
async fn keep(inner: Arc<Inner>, lost: watch::Sender<bool>) {
    let ttl = inner.candidate.ttl;
    let etcd = &inner.candidate.etcd;
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        match etcd.keep_alive(inner.lease).await {
            Ok(left) if left > 0 => renewed = Instant::now(),
            Ok(_) => break,
            Err(_) if renewed.elapsed() >= ttl => break,
            Err(_) => {}
        }
    }
    let _ = lost.send(true);
}
