//! MQTT topic names between agent and relay, and the rule for site ids that appear in them.

/// The filter a relay subscribes to for every site's batches.
pub const ALL_BATCHES_FILTER: &str = "backhaul/v1/sites/+/batches";
const PREFIX: &str = "backhaul/v1/sites/";

/// Where an agent publishes its batches.
pub fn batches_topic(site: &str) -> String {
    format!("{PREFIX}{site}/batches")
}

/// Where the relay acknowledges a site's batches.
pub fn acks_topic(site: &str) -> String {
    format!("{PREFIX}{site}/acks")
}

/// Where the relay reports what the ERP did with each of a site's events.
pub fn outcomes_topic(site: &str) -> String {
    format!("{PREFIX}{site}/outcomes")
}

/// Where the relay sends the refusals it keeps for a site until the agent acknowledges them.
pub fn refusals_topic(site: &str) -> String {
    format!("{PREFIX}{site}/refusals")
}

/// Where an agent acknowledges the refusals it has stored.
pub fn refusal_acks_topic(site: &str) -> String {
    format!("{PREFIX}{site}/refusal-acks")
}

/// Where an agent publishes its daily tally, for reconciliation.
pub fn tally_topic(site: &str) -> String {
    format!("{PREFIX}{site}/tally")
}

/// The filter a relay subscribes to for every site's tally.
pub const ALL_TALLIES_FILTER: &str = "backhaul/v1/sites/+/tally";

/// The site a tally topic belongs to, or `None` if the topic is not one.
pub fn site_of_tally_topic(topic: &str) -> Option<&str> {
    let site = topic.strip_prefix(PREFIX)?.strip_suffix("/tally")?;
    check_site_id(site).ok().map(|()| site)
}

/// The filter a relay subscribes to for every site's refusal acknowledgements.
pub const ALL_REFUSAL_ACKS_FILTER: &str = "backhaul/v1/sites/+/refusal-acks";

/// The site a refusal-acks topic belongs to, or `None` if the topic is not one.
pub fn site_of_refusal_acks_topic(topic: &str) -> Option<&str> {
    let site = topic.strip_prefix(PREFIX)?.strip_suffix("/refusal-acks")?;
    check_site_id(site).ok().map(|()| site)
}

/// The site a batches topic belongs to, or `None` if the topic is not a batches topic.
pub fn site_of_batches_topic(topic: &str) -> Option<&str> {
    let site = topic.strip_prefix(PREFIX)?.strip_suffix("/batches")?;
    check_site_id(site).ok().map(|()| site)
}

/// A site id names a topic level, a directory and a metric label: 1-64 characters of
/// `a-z 0-9 - _`, starting with a letter or digit.
pub fn check_site_id(site: &str) -> Result<(), String> {
    let ok_chars = site
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    let ok_start = site
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if site.is_empty() || site.len() > 64 || !ok_chars || !ok_start {
        return Err(format!(
            "a site id of 1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or \
             digit (got {site:?})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_topic_round_trips_to_its_site() {
        assert_eq!(
            site_of_batches_topic(&batches_topic("wh-east")),
            Some("wh-east")
        );
        assert_eq!(site_of_batches_topic("backhaul/v1/sites/+/batches"), None);
        assert_eq!(site_of_batches_topic("backhaul/v1/sites/a/b/batches"), None);
        assert_eq!(site_of_batches_topic(&acks_topic("wh-east")), None);
    }
}
