# frozen_string_literal: true

module Microsandbox
  # Normalises the `secrets:`, `on_secret_violation:` and `tls:` options of
  # {Sandbox.create} into the engine's wire form. Mistakes raise ArgumentError naming the
  # key (`secrets[0].host`), never a value; the engine checks the rest
  # ({InvalidConfigError}, {TlsError}).
  # @api private
  module Secrets
    module_function

    SECRET_KEYS = %i[env value host hosts host_patterns placeholder require_tls inject_headers
                     inject_basic_auth inject_query inject_body on_violation].freeze
    TLS_KEYS = %i[bypass verify_upstream intercepted_ports block_quic upstream_ca_cert
                  intercept_ca_cert intercept_ca_key intercept_all].freeze
    ACTIONS = %w[block block_and_log block_and_terminate passthrough].freeze
    PASSTHROUGH_KEYS = %i[passthrough_hosts passthrough_host_patterns passthrough_all_hosts].freeze

    # @param list [Array<Hash>, nil]
    # @return [Array<Hash>] wire entries (with values: never store or print them)
    def secrets!(list)
      return [] if list.nil?
      raise ArgumentError, "secrets must be an Array of Hashes" unless list.is_a?(Array)

      list.each_with_index.map { |entry, i| secret!("secrets[#{i}]", entry) }
    end

    def secret!(at, entry)
      raise ArgumentError, "#{at} must be a Hash" unless entry.is_a?(Hash)

      h = symbolize!(at, entry, SECRET_KEYS)
      env = h[:env]
      raise ArgumentError, "#{at}.env is required (the guest variable that gets the placeholder)" if env.nil?
      raise ArgumentError, "#{at}.env must be a String or Symbol" unless env.is_a?(String) || env.is_a?(Symbol)

      at = "#{at} (#{env})"
      raise ArgumentError, "#{at}.value is required" if h[:value].nil?
      raise ArgumentError, "#{at}.value must be a String" unless h[:value].is_a?(String)
      raise ArgumentError, "#{at}.value must not be empty" if h[:value].empty?

      hosts = []
      hosts << string!("#{at}.host", h[:host]) if h.key?(:host)
      hosts.concat(strings!("#{at}.hosts", h[:hosts])) if h.key?(:hosts)
      hosts.concat(strings!("#{at}.host_patterns", h[:host_patterns])) if h.key?(:host_patterns)
      raise ArgumentError, "#{at}: give host:, hosts: or host_patterns: (where the value may be sent)" if hosts.empty?

      wire = { "env" => env.to_s, "value" => h[:value], "hosts" => hosts }
      wire["placeholder"] = string!("#{at}.placeholder", h[:placeholder]) if h.key?(:placeholder)
      wire["require_tls"] = bool!("#{at}.require_tls", h[:require_tls]) if h.key?(:require_tls)
      inject = {}
      { inject_headers: "headers", inject_basic_auth: "basic_auth", inject_query: "query",
        inject_body: "body" }.each do |key, part|
        inject[part] = bool!("#{at}.#{key}", h[key]) if h.key?(key)
      end
      wire["inject"] = inject unless inject.empty?
      wire["on_violation"] = violation!("#{at}.on_violation", h[:on_violation]) if h.key?(:on_violation)
      wire
    end

    # @return [String, Hash] `"block"`… or `{"passthrough" => [host patterns]}`
    def violation!(at, value)
      case value
      when String, Symbol
        name = value.to_s
        raise ArgumentError, "#{at} must be one of #{ACTIONS.join(", ")} or a passthrough Hash" unless ACTIONS.include?(name)

        name
      when Hash
        h = symbolize!(at, value, PASSTHROUGH_KEYS)
        return "passthrough" if h[:passthrough_all_hosts] == true

        hosts = strings!("#{at}.passthrough_hosts", h.fetch(:passthrough_hosts, [])) +
                strings!("#{at}.passthrough_host_patterns", h.fetch(:passthrough_host_patterns, []))
        raise ArgumentError, "#{at}: give passthrough_hosts:, passthrough_host_patterns: or passthrough_all_hosts: true" if hosts.empty?

        { "passthrough" => hosts }
      else
        raise ArgumentError, "#{at} must be a String, Symbol or Hash"
      end
    end

    # @return [Hash, nil] the engine's `tls` options (paths or PEM texts as given)
    def tls!(value)
      return nil if value.nil?
      raise ArgumentError, "tls must be a Hash" unless value.is_a?(Hash)

      h = symbolize!("tls", value, TLS_KEYS)
      wire = {}
      wire["bypass"] = strings!("tls.bypass", h[:bypass]) if h.key?(:bypass)
      wire["verify_upstream"] = bool!("tls.verify_upstream", h[:verify_upstream]) if h.key?(:verify_upstream)
      wire["block_quic"] = bool!("tls.block_quic", h[:block_quic]) if h.key?(:block_quic)
      wire["intercept_all"] = bool!("tls.intercept_all", h[:intercept_all]) if h.key?(:intercept_all)
      if h.key?(:intercepted_ports)
        ports = Array(h[:intercepted_ports])
        unless !ports.empty? && ports.all? { |p| p.is_a?(Integer) && p.between?(1, 65_535) }
          raise ArgumentError, "tls.intercepted_ports must be ports 1-65535"
        end

        wire["intercepted_ports"] = ports
      end
      wire["upstream_ca_cert"] = strings!("tls.upstream_ca_cert", Array(h[:upstream_ca_cert])) if h.key?(:upstream_ca_cert)
      %i[intercept_ca_cert intercept_ca_key].each do |k|
        wire[k.to_s] = string!("tls.#{k}", h[k]) if h.key?(k)
      end
      wire
    end

    def symbolize!(at, hash, allowed)
      hash.to_h do |k, v|
        key = k.is_a?(String) || k.is_a?(Symbol) ? k.to_sym : nil
        raise ArgumentError, "#{at}: unknown key #{k.inspect} (allowed: #{allowed.join(", ")})" unless allowed.include?(key)

        [key, v]
      end
    end

    def string!(at, value)
      raise ArgumentError, "#{at} must be a String" unless value.is_a?(String)

      value
    end

    def strings!(at, value)
      value = [value] if value.is_a?(String)
      raise ArgumentError, "#{at} must be an Array of Strings" unless value.is_a?(Array) && value.all?(String)

      value
    end

    def bool!(at, value)
      raise ArgumentError, "#{at} must be true or false" unless [true, false].include?(value)

      value
    end
  end
end
