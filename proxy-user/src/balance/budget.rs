//! A retry budget per service, as linkerd2-proxy has it: retries may add at most `ratio`
//! of the requests of the last `window`, plus `min_per_sec` (so a quiet service can still
//! retry). Every request deposits, every retry withdraws; both expire after the window.
//! When the budget is spent the failure goes to the client at once: retries then cannot
//! multiply the load on a service that is already failing.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BudgetSettings {
    /// Retries per request allowed over the window (0.2: 20 %).
    pub ratio: f64,
    /// Retries per second allowed whatever the traffic.
    pub min_per_sec: u32,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_sec: 10,
        }
    }
}

/// The window, in one-second slots.
const SLOTS: usize = 10;
const SLOT: Duration = Duration::from_secs(1);

pub struct Budget {
    settings: BudgetSettings,
    inner: Mutex<Slots>,
}

struct Slots {
    origin: Instant,
    /// Index (seconds since `origin`) of the newest slot written.
    head: u64,
    deposits: [u64; SLOTS],
    withdrawals: [u64; SLOTS],
}

impl Slots {
    /// Moves the window to `now`, clearing the slots that fell out of it.
    fn advance(&mut self, now: Instant) -> usize {
        let at = now.saturating_duration_since(self.origin).as_secs() / SLOT.as_secs();
        if at > self.head {
            let gone = (at - self.head).min(SLOTS as u64);
            for i in 1..=gone {
                let idx = ((self.head + i) % SLOTS as u64) as usize;
                self.deposits[idx] = 0;
                self.withdrawals[idx] = 0;
            }
            self.head = at;
        }
        (self.head % SLOTS as u64) as usize
    }
}

impl Budget {
    pub fn new(settings: BudgetSettings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Slots {
                origin: Instant::now(),
                head: 0,
                deposits: [0; SLOTS],
                withdrawals: [0; SLOTS],
            }),
        }
    }

    #[cfg(test)]
    pub fn starting_at(settings: BudgetSettings, origin: Instant) -> Self {
        let b = Self::new(settings);
        b.inner.lock().unwrap().origin = origin;
        b
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One request (not a retry) was sent.
    pub fn deposit(&self, now: Instant) {
        let mut s = self.slots();
        let i = s.advance(now);
        s.deposits[i] += 1;
    }

    /// Takes one retry from the budget if it has one.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut s = self.slots();
        let i = s.advance(now);
        let deposits: u64 = s.deposits.iter().sum();
        let withdrawals: u64 = s.withdrawals.iter().sum();
        let allowed = self.settings.ratio * deposits as f64
            + f64::from(self.settings.min_per_sec) * SLOTS as f64 * SLOT.as_secs_f64();
        if (withdrawals as f64) + 1.0 <= allowed {
            s.withdrawals[i] += 1;
            true
        } else {
            false
        }
    }
}
