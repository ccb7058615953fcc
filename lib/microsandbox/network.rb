# frozen_string_literal: true

require "json"
require "ipaddr"

module Microsandbox
  # Rule destinations for {Rule.allow} / {Rule.deny}: what an egress rule reaches, or the
  # peer an ingress rule admits. Each method returns the wire Hash
  # (`{"destination_kind" => ..., "destination" => ...}`); a plain String given to
  # `destination:` is read as shorthand instead (see {Rule}).
  #
  # @example
  #   Microsandbox::Destination.cidr("10.0.0.0/8")
  #   Microsandbox::Destination.domain("api.example.com")
  #   Microsandbox::Destination.group(:metadata)
  module Destination
    # The destination groups. Every address is in exactly one; DESIGN.md
    # ("Network policy") has the table of ranges.
    GROUPS = %i[public loopback private link_local metadata multicast host].freeze

    module_function

    # Any destination.
    # @return [Hash{String => String}]
    def any
      { "destination_kind" => "any" }
    end

    # One address (IPv4 or IPv6). An IPv6 form carrying an IPv4 address
    # (`::ffff:a.b.c.d`, NAT64, 6to4) also matches that IPv4 address.
    # @param value [String, IPAddr]
    # @return [Hash{String => String}]
    def ip(value)
      { "destination_kind" => "ip", "destination" => Network.text("destination", value) }
    end

    # A network in CIDR notation, e.g. `"10.0.0.0/8"` (host bits are cleared).
    # @param value [String, IPAddr]
    # @return [Hash{String => String}]
    def cidr(value)
      { "destination_kind" => "cidr", "destination" => Network.text("destination", value) }
    end

    # An exact domain name. Matches a connection only to an address this sandbox
    # resolved for the name (through its DNS), while the answer's TTL lasts.
    # @param value [String]
    # @return [Hash{String => String}]
    def domain(value)
      { "destination_kind" => "domain", "destination" => Network.text("destination", value) }
    end

    # A domain and all its subdomains, e.g. `".example.com"` (also `"example.com"` or
    # `"*.example.com"`). `evil-example.com` is not under `example.com`.
    # @param value [String]
    # @return [Hash{String => String}]
    def domain_suffix(value)
      { "destination_kind" => "domain_suffix", "destination" => Network.text("destination", value) }
    end

    # A destination group, one of {GROUPS}.
    # @param value [Symbol, String]
    # @return [Hash{String => String}]
    # @raise [NetworkPolicyError] for an unknown group
    def group(value)
      name = Network.text("destination", value).downcase.tr("-", "_")
      unless GROUPS.include?(name.to_sym)
        raise NetworkPolicyError, "destination: unknown group; expected one of #{GROUPS.join(", ")}"
      end

      { "destination_kind" => "group", "destination" => name.tr("_", "-") }
    end
  end

  # Network policy rules. A rule pairs an action with a direction, a destination and
  # optional protocol and port filters. Rules are tried in order and the first that
  # matches decides; when none matches, the policy's default for the direction applies.
  #
  # `destination:` is a {Destination} Hash, nil (any), or a shorthand String: `"*"`,
  # a group name (`"public"`), an address (`"1.1.1.1"`), a CIDR (`"10.0.0.0/8"`),
  # a suffix (`".internal"`, `"*.internal"`) or a domain (`"api.example.com"`).
  # Ports are Integers, Strings (`"443"`, `"8000-9000"`) or Integer Ranges; a rule with
  # ports only matches TCP and UDP.
  #
  # @example
  #   Microsandbox::Rule.allow(destination: "api.example.com", protocol: :tcp, port: 443)
  #   Microsandbox::Rule.deny(destination: Microsandbox::Destination.group(:metadata))
  #   Microsandbox::Rule.allow(direction: :ingress, destination: "10.0.0.0/8", ports: [8000..9000])
  module Rule
    module_function

    # An allow rule.
    # @param destination [Hash, String, Symbol, nil] see {Rule}
    # @param direction [:egress, :ingress, :any] `:egress` is the guest connecting out;
    #   `:ingress` a peer connecting to a published port
    # @param protocol [Symbol, String, nil] `:tcp`, `:udp`, `:icmpv4` or `:icmpv6`
    # @param protocols [Array<Symbol, String>, nil] several of those (merged with `protocol:`)
    # @param port [Integer, String, Range, nil]
    # @param ports [Array<Integer, String, Range>, nil] merged with `port:`
    # @return [Hash{String => Object}] the wire rule
    # @raise [NetworkPolicyError] when the rule is malformed (unknown protocol, bad port…)
    def allow(destination: nil, direction: :egress, protocol: nil, protocols: nil, port: nil, ports: nil)
      Network.rule("allow", destination, direction, protocol, protocols, port, ports)
    end

    # A deny rule; arguments as {allow}.
    # @return [Hash{String => Object}]
    # @raise [NetworkPolicyError]
    def deny(destination: nil, direction: :egress, protocol: nil, protocols: nil, port: nil, ports: nil)
      Network.rule("deny", destination, direction, protocol, protocols, port, ports)
    end

    # DNS to the sandbox's gateway (UDP and TCP port 53, group `host`): a custom policy
    # with `default_egress: :deny` needs it (or a domain allow rule) to resolve names.
    # @return [Hash{String => Object}]
    def allow_dns
      allow(destination: Destination.group(:host), protocols: %i[udp tcp], port: 53)
    end
  end

  # A sandbox's network policy, for `Sandbox.create(network:)`.
  #
  # Presets: `public_only` (the default: the public internet and DNS; loopback, private,
  # link-local, metadata, multicast and the host refused), `none` (no network device at
  # all), `allow_all`, `non_local` (public plus private ranges). Or a custom rule list
  # with per-direction defaults. `network:` also takes a preset name (String/Symbol, any
  # alias in {PRESET_ALIASES}) or a Hash:
  # - `{ preset: :public_only, deny_domains: [...], deny_domain_suffixes: [...] }`
  #   (a preset with names denied; rules or defaults cannot be added to a preset);
  # - `{ default_egress:, default_ingress:, rules:, deny_domains:, deny_domain_suffixes: }`
  #   (custom, as {custom});
  # - `{ deny_domains: [...] }` alone: everything allowed except those names;
  # - `{}`: the default policy.
  #
  # Malformed policies raise {NetworkPolicyError} when they are built, naming the bad
  # key and never echoing its value. Validation is the engine's own parser.
  #
  # @example
  #   policy = Microsandbox::NetworkPolicy.custom(
  #     rules: [Microsandbox::Rule.allow_dns,
  #             Microsandbox::Rule.allow(destination: "api.example.com", protocol: :tcp, port: 443)],
  #     deny_domain_suffixes: [".ads.example"]
  #   )
  #   Microsandbox::Sandbox.create("agent", image: "alpine", network: policy)
  class NetworkPolicy
    # Every accepted preset spelling (lower-case) → its canonical name.
    PRESET_ALIASES = {
      "none" => "none", "disabled" => "none", "disable" => "none", "airgapped" => "none",
      "public" => "public_only", "public_only" => "public_only", "public-only" => "public_only",
      "default" => "public_only",
      "all" => "allow_all", "allow_all" => "allow_all", "allow-all" => "allow_all",
      "non_local" => "non_local", "non-local" => "non_local", "nonlocal" => "non_local"
    }.freeze

    # Keys of a `network:` Hash.
    HASH_KEYS = %w[preset default_egress default_ingress rules deny_domains deny_domain_suffixes].freeze

    class << self
      # @return [NetworkPolicy] the default: public internet and DNS only
      def public_only = preset("public_only")

      # @return [NetworkPolicy] no network device at all (connections fail at once)
      def none = preset("none")

      # @return [NetworkPolicy] everything allowed, both directions
      def allow_all = preset("allow_all")

      # @return [NetworkPolicy] {public_only} plus the private ranges
      def non_local = preset("non_local")

      # @param name [String, Symbol] a key of {PRESET_ALIASES} (case-insensitive)
      # @return [NetworkPolicy]
      # @raise [NetworkPolicyError] for an unknown name (the message lists the valid ones)
      def preset(name)
        new({ "preset" => canonical_preset(name) })
      end

      # A custom policy.
      # @param default_egress [:allow, :deny] for connections the guest opens that no rule matches
      # @param default_ingress [:allow, :deny] for connections to published ports that no rule matches
      # @param rules [Array<Hash>] {Rule}s (or Hashes of the same keys), first match wins
      # @param deny_domains [Array<String>] names answered NXDOMAIN and refused; placed
      #   before every rule
      # @param deny_domain_suffixes [Array<String>] the same for whole subtrees (`".ads.example"`)
      # @return [NetworkPolicy]
      # @raise [NetworkPolicyError] naming the bad key
      def custom(default_egress: :deny, default_ingress: :allow, rules: [], deny_domains: [], deny_domain_suffixes: [])
        new(custom_wire(default_egress, default_ingress, rules, deny_domains, deny_domain_suffixes))
      end

      # Turns any accepted `network:` value into a policy.
      # @api private
      # @param value [NetworkPolicy, String, Symbol, Hash, nil] nil is the default policy
      # @return [NetworkPolicy] (its {#to_h} is the wire Hash the engine parses)
      # @raise [TypeError] for another type
      # @raise [NetworkPolicyError] for a malformed policy
      def coerce(value)
        case value
        when NetworkPolicy then value
        when nil then public_only
        when String, Symbol then preset(value)
        when Hash then new(hash_wire(value))
        else
          raise TypeError, "network must be a preset name (String/Symbol), a Microsandbox::NetworkPolicy " \
                           "or a Hash (got #{value.class})"
        end
      end

      private

      def canonical_preset(name)
        unless name.is_a?(String) || name.is_a?(Symbol)
          raise TypeError, "network preset must be a String or Symbol (got #{name.class})"
        end

        PRESET_ALIASES.fetch(name.to_s.downcase) do
          raise NetworkPolicyError, "network: unknown preset; expected one of #{PRESET_ALIASES.keys.join(", ")}"
        end
      end

      def custom_wire(default_egress, default_ingress, rules, deny_domains, deny_domain_suffixes)
        wire = {
          "default_egress" => Network.text("network.default_egress", default_egress),
          "default_ingress" => Network.text("network.default_ingress", default_ingress),
          "rules" => Network.list("network.rules", rules).each_with_index.map { |r, i| Network.normalize_rule(r, i) }
        }
        add_deny_lists(wire, deny_domains, deny_domain_suffixes)
      end

      def add_deny_lists(wire, deny_domains, deny_domain_suffixes)
        { "deny_domains" => deny_domains, "deny_domain_suffixes" => deny_domain_suffixes }.each do |key, list|
          items = Network.list("network.#{key}", list).map { |d| Network.text("network.#{key}", d) }
          wire[key] = items unless items.empty?
        end
        wire
      end

      def hash_wire(hash)
        h = hash.to_h do |k, v|
          unless k.is_a?(String) || k.is_a?(Symbol)
            raise TypeError, "network Hash keys must be Strings or Symbols (got #{k.class})"
          end

          [k.to_s, v]
        end
        unknown = h.keys - HASH_KEYS
        unless unknown.empty?
          raise NetworkPolicyError, "network: unknown key #{Network.key_name(unknown.first)}; expected one of #{HASH_KEYS.join(", ")}"
        end

        wire = {}
        wire["preset"] = canonical_preset(h["preset"]) if h.key?("preset")
        %w[default_egress default_ingress].each { |k| wire[k] = Network.text("network.#{k}", h[k]) if h.key?(k) }
        if h.key?("rules")
          wire["rules"] = Network.list("network.rules", h["rules"]).each_with_index.map { |r, i| Network.normalize_rule(r, i) }
        end
        add_deny_lists(wire, h["deny_domains"], h["deny_domain_suffixes"])
      end
    end

    # @param wire [Hash{String => Object}] a normalised wire Hash (validated here)
    # @raise [NetworkPolicyError]
    # @api private
    def initialize(wire)
      json = JSON.generate(wire)
      Native.check_network_policy(json)
      @wire = JSON.parse(json, freeze: true)
      freeze
    end

    # The wire Hash the engine parses: `{"preset" => name}` or `{"default_egress" =>,
    # "default_ingress" =>, "rules" => [...], "deny_domains" =>, "deny_domain_suffixes" =>}`
    # (String keys and values; empty lists omitted). Frozen.
    # @return [Hash{String => Object}]
    def to_h
      @wire
    end

    # The canonical preset name, or nil for a custom policy.
    # @return [String, nil]
    def preset
      @wire["preset"]
    end

    # True for the `none` preset (the sandbox gets no network device).
    # @return [Boolean]
    def none?
      preset == "none"
    end

    # @return [Boolean] same wire Hash
    def ==(other)
      other.is_a?(NetworkPolicy) && other.to_h == @wire
    end
    alias eql? ==

    # @return [Integer]
    def hash
      @wire.hash
    end

    # @return [String]
    def inspect
      "#<Microsandbox::NetworkPolicy #{@wire.inspect}>"
    end
  end

  # Helpers shared by {Destination}, {Rule} and {NetworkPolicy}.
  # @api private
  module Network
    PROTOCOLS = %w[tcp udp icmpv4 icmpv6].freeze
    RULE_KEYS = %w[action direction destination_kind destination protocols protocol ports port].freeze

    module_function

    # A String or Symbol (or an IPAddr, written with its prefix) as a String.
    def text(key, value)
      case value
      when String then value
      when Symbol then value.to_s
      when IPAddr
        full = value.ipv4? ? 32 : 128
        value.prefix == full ? value.to_s : "#{value}/#{value.prefix}"
      else raise TypeError, "#{key} must be a String or Symbol (got #{value.class})"
      end
    end

    # nil → [], one item → [item], an Array as is.
    def list(key, value)
      case value
      when nil then []
      when Array then value
      when Hash then raise TypeError, "#{key} must be an Array (got Hash)"
      else [value]
      end
    end

    # A port as the wire writes it: "443" or "8000-9000".
    def port(key, value)
      case value
      when Integer, String then value.to_s
      when Range
        unless value.begin.is_a?(Integer) && value.end.is_a?(Integer)
          raise TypeError, "#{key} Range must have Integer ends"
        end

        last = value.exclude_end? ? value.end - 1 : value.end
        "#{value.begin}-#{last}"
      else raise TypeError, "#{key} must be an Integer, a String like \"8000-9000\" or an Integer Range (got #{value.class})"
      end
    end

    # Builds and validates one rule ({Rule.allow}/{Rule.deny}).
    def rule(action, destination, direction, protocol, protocols, port, ports)
      wire = normalize_rule({ "action" => action, "direction" => direction, "destination" => destination,
                              "protocols" => list("protocols", protocols) + list("protocol", protocol),
                              "ports" => list("ports", ports) + list("port", port) }, nil)
      begin
        Native.check_network_policy(JSON.generate({ "rules" => [wire] }))
      rescue NetworkPolicyError => e
        raise NetworkPolicyError, e.message.sub(/\Anetwork\.rules\[0\]/, "rule")
      end
      wire.freeze
    end

    # A rule Hash (from {Rule} or written by hand, String or Symbol keys, singular or
    # plural protocol/port keys, a {Destination} Hash or a shorthand String) → wire rule.
    def normalize_rule(rule, index)
      key = index.nil? ? "rule" : "network.rules[#{index}]"
      raise TypeError, "#{key} must be a Hash (use Microsandbox::Rule.allow/deny; got #{rule.class})" unless rule.is_a?(Hash)

      r = rule.to_h { |k, v| [k.to_s, v] }
      unknown = r.keys - RULE_KEYS
      raise NetworkPolicyError, "#{key}: unknown key #{key_name(unknown.first)}; expected one of #{RULE_KEYS.join(", ")}" unless unknown.empty?

      out = {}
      out["action"] = text("#{key}.action", r["action"]) unless r["action"].nil?
      out["direction"] = text("#{key}.direction", r["direction"]) unless r["direction"].nil?
      destination!(key, r, out)
      protos = (list("#{key}.protocols", r["protocols"]) + list("#{key}.protocol", r["protocol"]))
               .map { |p| text("#{key}.protocols", p).downcase }.uniq
      out["protocols"] = protos unless protos.empty?
      prts = (list("#{key}.ports", r["ports"]) + list("#{key}.port", r["port"])).map { |p| port("#{key}.ports", p) }
      out["ports"] = prts unless prts.empty?
      out
    end

    def destination!(key, rule, out)
      dest = rule["destination"]
      if dest.is_a?(Hash)
        raise NetworkPolicyError, "#{key}: destination_kind given twice" if rule.key?("destination_kind")

        d = dest.to_h { |k, v| [k.to_s, v] }
        out["destination_kind"] = text("#{key}.destination_kind", d["destination_kind"]) if d.key?("destination_kind")
        out["destination"] = text("#{key}.destination", d["destination"]) unless d["destination"].nil?
      else
        out["destination_kind"] = text("#{key}.destination_kind", rule["destination_kind"]) unless rule["destination_kind"].nil?
        out["destination"] = text("#{key}.destination", dest) unless dest.nil?
      end
    end

    # The `dns:` option of `Sandbox.create` → the wire Hash the engine parses
    # (`"nameservers"`, `"query_timeout_ms"`, `"rebind_protection"`), validated by the
    # engine's parser: nameservers are `"1.1.1.1"`, `"127.0.0.1:5353"`, `"[::1]:5353"` or
    # `"dns.example:53"` (at most 8); the timeout is 1..60000 ms.
    # @param value [Hash, nil]
    # @return [Hash{String => Object}, nil] frozen; nil for nil
    # @raise [TypeError] when not a Hash
    # @raise [NetworkPolicyError] naming the bad key (`dns.nameservers[1]: …`), never the value
    def dns_options(value)
      return nil if value.nil?
      raise TypeError, "dns must be a Hash (got #{value.class})" unless value.is_a?(Hash)

      wire = value.to_h do |k, v|
        raise TypeError, "dns keys must be Strings or Symbols (got #{k.class})" unless k.is_a?(String) || k.is_a?(Symbol)

        [k.to_s, v]
      end
      json = JSON.generate(wire)
      Native.check_dns_config(json)
      JSON.parse(json, freeze: true)
    end

    # A user's key in a message only when it looks like an identifier.
    def key_name(key)
      key.match?(/\A[A-Za-z0-9_-]{1,40}\z/) ? key : "(unprintable)"
    end
  end
end
