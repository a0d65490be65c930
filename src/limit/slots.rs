//! `max_concurrency`: one semaphore per upstream, resized in place when a reload changes the cap,
//! so requests holding a slot under the old size count against the new one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// A cap and the semaphore that enforces it.
type Cap = (usize, Arc<Semaphore>);

#[derive(Default)]
pub struct Slots {
    by_upstream: Mutex<HashMap<Arc<str>, Cap>>,
}

impl Slots {
    /// The semaphore of `upstream`, sized to `max`.
    pub fn of(&self, upstream: &Arc<str>, max: usize) -> Arc<Semaphore> {
        let mut slots = crate::kit::lock(&self.by_upstream);
        match slots.get_mut(upstream) {
            Some((size, semaphore)) => {
                if max > *size {
                    semaphore.add_permits(max - *size);
                } else if max < *size {
                    let shrink = *size - max;
                    let rest = shrink - semaphore.forget_permits(shrink);
                    if rest > 0 {
                        // Slots in use now are forgotten as they come back.
                        let semaphore = semaphore.clone();
                        tokio::spawn(async move {
                            if let Ok(permits) =
                                semaphore.acquire_many_owned(u32::try_from(rest).unwrap_or(u32::MAX)).await
                            {
                                permits.forget();
                            }
                        });
                    }
                }
                *size = max;
                semaphore.clone()
            }
            None => {
                let semaphore = Arc::new(Semaphore::new(max));
                slots.insert(upstream.clone(), (max, semaphore.clone()));
                semaphore
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_smaller_cap_takes_effect_as_slots_come_back() {
        let slots = Slots::default();
        let name: Arc<str> = Arc::from("hubspot");
        let semaphore = slots.of(&name, 3);
        let held: Vec<_> = (0..3).map(|_| semaphore.clone().try_acquire_owned().unwrap()).collect();
        let semaphore = slots.of(&name, 1);
        drop(held);
        tokio::task::yield_now().await;
        let one = semaphore.clone().try_acquire_owned();
        assert!(one.is_ok());
        assert!(semaphore.clone().try_acquire_owned().is_err(), "one slot under the new cap");
        drop(one);
        let semaphore = slots.of(&name, 2);
        assert_eq!(semaphore.available_permits(), 2);
    }
}
