# frozen_string_literal: true

module Microsandbox
  # The NIC options of {Sandbox.create} besides the policy: `ports:`, `ports_udp:`,
  # `ipv4_pool:`, `ipv6_pool:`, `max_connections:`. This module only normalises the
  # spellings into what the engine takes; the engine checks the values (port ranges,
  # duplicates, the pools' CIDRs, the connection cap) and raises {InvalidConfigError}
  # naming the option.
  #
  # @api private
  module NetOptions
    # `"address:port"` / `"[v6]:port"` keys (the host address to bind).
    ADDRESS_KEY = /\A(?:\[(?<v6>[^\]]*)\]|(?<v4>[^:\[\]]+)):(?<port>\d+)\z/

    module_function

    # @param ports [Hash, nil] `{ host => guest }`, TCP
    # @param ports_udp [Hash, nil] `{ host => guest }`, UDP
    # @param ipv4_pool [String, nil]
    # @param max_connections [Integer, String, nil]
    # @param ipv6_pool [String, nil]
    # @return [Hash{String=>Object}] engine config keys
    # @raise [TypeError, ArgumentError] a malformed spelling (names the option, not the value)
    def config(ports, ports_udp, ipv4_pool, max_connections, ipv6_pool = nil)
      out = {}
      out["ports"] = ports!("ports", ports) unless ports.nil?
      out["ports_udp"] = ports!("ports_udp", ports_udp) unless ports_udp.nil?
      out["ipv4_pool"] = ipv4_pool.to_s unless ipv4_pool.nil?
      out["ipv6_pool"] = ipv6_pool.to_s unless ipv6_pool.nil?
      out["max_connections"] = integer!("max_connections", max_connections) unless max_connections.nil?
      out
    end

    # `{ 8080 => 80, "8081" => 81, "0.0.0.0:8082" => 82, "[::1]:8083" => 83 }` →
    # `[{ "host_port" => 8080, "guest_port" => 80 }, { "bind" => "0.0.0.0", … }, …]`.
    # Keys and values go through `Integer()` as in the reference gem.
    def ports!(name, value)
      raise TypeError, "#{name} must be a Hash of host port => guest port (got #{value.class})" unless value.is_a?(Hash)

      value.map do |host, guest|
        entry = host_key!(name, host)
        entry["guest_port"] = integer!("#{name} (a guest port)", guest)
        entry
      end
    end

    # An IPv6 address and a port without brackets (`"::1:8080"`, `"fe80::1:80"`): which
    # colon starts the port? (At least three colons, or a `::`: `"80:90:100"` is just junk.)
    BARE_V6 = /\A(?=.*::|(?:[^:]*:){3})[0-9a-fA-F:.]+\z/

    # One key of `ports:`: a port, or `"address:port"` (the engine checks the address: not
    # an address, or not the host's → {InvalidConfigError} naming `ports[i]`).
    def host_key!(name, host)
      if host.is_a?(String) && BARE_V6.match?(host.strip)
        raise ArgumentError, "#{name}: an IPv6 host address goes in brackets, \"[address]:port\" " \
                             "(e.g. \"[::1]:8080\", or \"[::]:8080\" for every IPv6 address of the host)"
      end

      host_port!(name, host)
    end

    def host_port!(name, host)
      if host.is_a?(String) && (m = ADDRESS_KEY.match(host.strip))
        return { "bind" => m[:v6] || m[:v4], "host_port" => Integer(m[:port], 10) }
      end

      { "host_port" => integer!("#{name} (a host port)", host) }
    rescue ArgumentError, TypeError
      raise ArgumentError, "#{name}: a host port is an Integer, a String of digits, or \"address:port\" " \
                           "(e.g. 8080, \"8080\", \"0.0.0.0:8080\", \"[::1]:8080\")"
    end

    def integer!(name, value)
      case value
      when Integer then value
      when String then Integer(value, 10)
      else raise TypeError, "#{name} must be an Integer (got #{value.class})"
      end
    rescue ArgumentError
      raise ArgumentError, "#{name} must be an Integer or a String of digits"
    end
  end
end
