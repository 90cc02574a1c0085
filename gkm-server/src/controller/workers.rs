//! Work split over threads: signing a rekey's datagrams, sealing its welcomes.

use super::*;

/// Signs datagrams on up to `workers` threads; the result keeps their order.
pub(super) fn sign_all(
    datagrams: &[RekeyDatagram],
    signer: &SigningKey,
    workers: usize,
) -> Vec<Vec<u8>> {
    on_workers(datagrams.iter().collect(), workers, |d| d.sign(signer))
}

/// Items a thread of [`on_workers`] takes at a time: about 1.5 ms of signatures or welcomes
/// (20–25 µs each), more than a thread costs to start and join.
pub(super) const WORKER_CHUNK: usize = 64;

/// `work` done on every item on up to `workers` threads (the calling thread is one); the
/// results keep the items' order. Threads take [`WORKER_CHUNK`] items at a time from a shared
/// queue rather than a fixed share, so a thread slowed by the save running beside it, or by the
/// host, leaves the rest to the others. A worker's panic is resumed here.
pub(super) fn on_workers<T: Send, U: Send>(
    items: Vec<T>,
    workers: usize,
    work: impl Fn(T) -> U + Sync,
) -> Vec<U> {
    if workers <= 1 || items.len() <= WORKER_CHUNK {
        return items.into_iter().map(work).collect();
    }
    let mut chunks = Vec::with_capacity(items.len().div_ceil(WORKER_CHUNK));
    let mut items = items.into_iter();
    loop {
        let chunk: Vec<T> = items.by_ref().take(WORKER_CHUNK).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push((chunks.len(), chunk));
    }
    let queue = Mutex::new(chunks.into_iter());
    let take = || {
        let mut done = Vec::new();
        // The guard moves into the closure and is dropped there: the lock is not held while
        // the chunk is worked on.
        while let Some((at, chunk)) = queue.lock().ok().and_then(|mut q| q.next()) {
            done.push((at, chunk.into_iter().map(&work).collect::<Vec<U>>()));
        }
        done
    };
    let mut done = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers).map(|_| scope.spawn(take)).collect();
        let mut done = take();
        for helper in helpers {
            match helper.join() {
                Ok(part) => done.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        done
    });
    done.sort_unstable_by_key(|(at, _)| *at);
    done.into_iter().flat_map(|(_, part)| part).collect()
}
